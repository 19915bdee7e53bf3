// A live time-series chart: uPlot over arrays that grow at the right and are trimmed at the
// left to at most `maxPoints` points.
import uPlot from "./vendor/uPlot.esm.js";

const COLORS = ["#1d4ed8", "#b45309", "#1b7f3b", "#9333ea"];
const HEIGHT = 200;
// The shortest time span shown. With one point, uPlot would otherwise stretch the time axis
// over 1,000 days.
const MIN_SPAN_SECONDS = 60;

// The x scale's range: uPlot's own, unless the points span less than MIN_SPAN_SECONDS.
function timeRange(plot, min, max) {
  const times = plot.data[0];
  const last = times[times.length - 1];
  if (times.length === 0 || last - times[0] >= MIN_SPAN_SECONDS) return [min, max];
  return [last - MIN_SPAN_SECONDS, last];
}

export class TimeChart {
  constructor(container, title, seriesLabels, maxPoints = 2000) {
    this.maxPoints = maxPoints;
    this.data = [[], ...seriesLabels.map(() => [])];
    const series = [
      {},
      ...seriesLabels.map((label, index) => ({
        label,
        stroke: COLORS[index % COLORS.length],
        width: 1.5,
        points: { show: false },
      })),
    ];
    this.plot = new uPlot(
      { title, width: this.width(container), height: HEIGHT, series, scales: { x: { time: true, range: timeRange } } },
      this.data,
      container,
    );
    this.container = container;
    this.onResize = () => this.plot.setSize({ width: this.width(container), height: HEIGHT });
    window.addEventListener("resize", this.onResize);
  }

  width(container) {
    return Math.max(300, container.clientWidth || 400);
  }

  // Add points at `time` (epoch seconds), one value per series. Times must not go backwards.
  append(time, values) {
    this.data[0].push(time);
    values.forEach((value, index) => this.data[index + 1].push(value));
    if (this.data[0].length > this.maxPoints) {
      for (const column of this.data) column.shift();
    }
    this.plot.setData(this.data);
  }

  // Replace all points; `rows` are [time, value, ...] sorted by time.
  load(rows) {
    const keep = rows.slice(-this.maxPoints);
    this.data = this.data.map((_, column) => keep.map((row) => row[column]));
    this.plot.setData(this.data);
  }

  lastTime() {
    const times = this.data[0];
    return times.length ? times[times.length - 1] : -Infinity;
  }

  destroy() {
    window.removeEventListener("resize", this.onResize);
    this.plot.destroy();
  }
}
