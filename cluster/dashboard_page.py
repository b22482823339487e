"""The overview page of `stoker dashboard` (`/stoker`): a table of searches and one of runs,
redrawn from `/stoker/api/overview` every two seconds. Self-contained (no scripts from
elsewhere: the view works on a cluster without internet access). Values go in as text nodes,
never as HTML, so a run named `<script>` stays a name."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stoker dashboard</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f4f4f4; }
.muted { color: #888; }
</style></head>
<body>
<h1>stoker dashboard</h1>
<p class="muted" id="updated">loading...</p>
<h2>Searches</h2>
<table id="searches"><thead><tr><th>search</th><th>done</th><th>stopped early</th><th>errored</th>
<th>running</th><th>best so far</th><th>trials, history, importance, parallel coordinates</th></tr></thead>
<tbody></tbody></table>
<h2>Runs</h2>
<table id="runs"><thead><tr><th>run</th><th>epoch</th><th>samples/s</th><th>ETA</th><th>state</th>
<th>final metrics</th><th>learning curves</th></tr></thead><tbody></tbody></table>
<script>
function cell(row, value) { const td = row.insertCell(); td.textContent = value ?? "-"; return td; }
function link(row, text, href) {
  const a = document.createElement("a"); a.textContent = text; a.href = href; row.insertCell().appendChild(a);
}
function eta(seconds) {
  if (seconds == null) return "-";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m ? `${m}m${String(s).padStart(2, "0")}s` : `${s}s`;
}
function searchRow(body, s) {
  const row = body.insertRow(), p = s.progress || {};
  row.dataset.name = s.name;
  cell(row, s.name + (s.damaged ? ` (${s.damaged} damaged log lines)` : ""));
  for (const key of ["done", "stopped", "errored", "running"]) cell(row, p[key]);
  cell(row, p.best == null ? "-" : `${p.metric} ${p.best.toFixed(4)} (trial ${p.best_trial})`);
  if (s.study == null) cell(row, "no trial log (a search from an older stoker)");
  else link(row, "open", `/dashboard/studies/${s.study}`);
}
function runRow(body, r) {
  const row = body.insertRow(), p = r.progress;
  row.dataset.name = r.name;
  cell(row, r.name);
  cell(row, p ? `${p.epoch + 1}/${p.epochs}` : "-");
  cell(row, p && p.samples_per_s != null ? Math.round(p.samples_per_s) : "-");
  cell(row, r.finished ? "-" : eta(p && p.eta_s));
  cell(row, r.finished ? "finished" : (p ? "training" : "starting"));
  cell(row, Object.entries(r.best).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", "));
  link(row, "TensorBoard", `/tensorboard/#timeseries&regexInput=${encodeURIComponent(r.name)}`);
}
async function refresh() {
  try {
    const overview = await (await fetch("/stoker/api/overview", {cache: "no-store"})).json();
    for (const [id, rows, draw] of [["searches", overview.searches, searchRow], ["runs", overview.runs, runRow]]) {
      const body = document.querySelector(`#${id} tbody`);
      body.replaceChildren();
      rows.forEach(item => draw(body, item));
    }
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("updated").textContent = `cannot reach the dashboard: ${error}`;
  }
}
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
