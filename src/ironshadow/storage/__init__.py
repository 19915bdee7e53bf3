"""Hot state and history stores, and the write-behind pipeline between them and the engine."""
