// Reads one task's event stream with a Node client nobody here wrote, and prints a JSON
// line per thing seen: {"open": true}, or {"event", "id", "data", "t"} for each message.
// Ends after task.succeeded. Usage: node sse_clients.mjs <eventsource|fetch-event-source> URL
import { createRequire } from "node:module";
import { performance } from "node:perf_hooks";

const [client, url] = process.argv.slice(2);
const require = createRequire(process.env.NODE_CLIENTS_DIR + "/");
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const seen = (event, id, data) => {
  print({ event, id, data, t: performance.timeOrigin + performance.now() });
  return event === "task.succeeded";
};
setTimeout(() => { print({ timeout: true }); process.exit(3); }, 20000);

if (client === "eventsource") {
  const { EventSource } = require("eventsource");
  const source = new EventSource(url);
  source.onopen = () => print({ open: true });
  const kinds = ["task.created", "task.progress", "task.succeeded", "message"];
  for (const kind of kinds) {
    source.addEventListener(kind, (e) => {
      if (seen(e.type, e.lastEventId, e.data)) { source.close(); process.exit(0); }
    });
  }
} else {
  // fetch-event-source is written for browsers: it touches window and document.
  globalThis.window = globalThis;
  globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
  const { fetchEventSource } = require("@microsoft/fetch-event-source");
  const stop = new AbortController();
  await fetchEventSource(url, {
    signal: stop.signal,
    openWhenHidden: true,
    async onopen() { print({ open: true }); },
    onmessage(m) { if (seen(m.event, m.id, m.data)) { stop.abort(); process.exit(0); } },
    onerror(err) { print({ error: String(err) }); },
  });
}
