"""The one-page playground served at `/`: plain HTML and inline JS, no build chain.

It asks /health which models are deployed, then POSTs the prompt and seed to /generate (and to
/reference when a reference is deployed) and shows each image with its round-trip and server time.
`document.body.dataset.state` is "busy" while requests are in flight and "done" after (for tests).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distar playground</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 24px; color: #222; max-width: 760px; }
 h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #666; margin-bottom: 16px; }
 form { display: flex; gap: 8px; align-items: end; flex-wrap: wrap; margin-bottom: 18px; }
 label { display: flex; flex-direction: column; font-size: 12px; color: #555; gap: 3px; }
 input { font: inherit; padding: 5px 7px; } #prompt { width: 300px; } #seed { width: 110px; }
 button { font: inherit; padding: 6px 14px; cursor: pointer; }
 .row { display: flex; gap: 28px; } .card { text-align: center; }
 .card img { width: 192px; height: 192px; image-rendering: pixelated; background: #eee; border: 1px solid #ccc; display: block; }
 .card h2 { font-size: 14px; margin: 0 0 6px; } .time { font-size: 13px; color: #444; margin-top: 6px; min-height: 1.2em; }
 #error { color: #b00020; margin: 10px 0; min-height: 1.2em; white-space: pre-line; }
</style></head>
<body data-state="busy">
<h1>distar playground</h1><div class="sub" id="models">loading&hellip;</div>
<form id="form">
 <label>prompt <input id="prompt" maxlength="200" value="a handwritten digit 3"></label>
 <label>seed <input id="seed" type="number" min="0" step="1" value="0"></label>
 <button type="button" id="random">random seed</button>
 <button type="submit" id="go">Generate</button>
</form>
<div id="error"></div>
<div class="row">
 <div class="card" id="gen-card"><h2 id="gen-name">generator</h2><img id="gen-img" alt="generated image"><div class="time" id="gen-time"></div></div>
 <div class="card" id="ref-card" hidden><h2 id="ref-name">reference</h2><img id="ref-img" alt="reference image"><div class="time" id="ref-time"></div></div>
</div>
<script>
const base = location.pathname.endsWith('/') ? location.pathname : location.pathname + '/';
const $ = (id) => document.getElementById(id);
let info = null;

async function draw(route, img, timeEl) {
  const body = {prompt: $('prompt').value, seed: Number($('seed').value), format: 'png'};
  timeEl.textContent = '\\u2026';
  const t0 = performance.now();
  const r = await fetch(base + route, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const ms = performance.now() - t0;
  if (!r.ok) {
    let msg = r.status + ' ' + r.statusText;
    try { msg = (await r.json()).message; } catch (e) {}
    timeEl.textContent = '';
    const e = $('error'); e.textContent += (e.textContent ? '\\n' : '') + route + ': ' + msg;
    return;
  }
  const blob = await r.blob();
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  await img.decode();
  const server = 1000 * Number(r.headers.get('X-Generation-Seconds'));
  timeEl.textContent = ms.toFixed(0) + ' ms round trip (server ' + server.toFixed(1) + ' ms)';
}

async function run(ev) {
  if (ev) ev.preventDefault();
  document.body.dataset.state = 'busy';
  $('error').textContent = '';
  const jobs = [draw('generate', $('gen-img'), $('gen-time'))];
  if (info && info.reference) jobs.push(draw('reference', $('ref-img'), $('ref-time')));
  try { await Promise.all(jobs); } catch (e) { $('error').textContent = String(e); }
  document.body.dataset.state = 'done';
}

$('random').onclick = () => { $('seed').value = Math.floor(Math.random() * 2147483647); };
$('form').onsubmit = run;
(async () => {
  try {
    info = await (await fetch(base + 'health')).json();
    $('gen-name').textContent = info.model;
    $('models').textContent = 'model ' + info.model + (info.reference ? ' \\u00b7 reference ' + info.reference : '') + ' \\u00b7 ' + info.device + (info.batching ? ' \\u00b7 batching' : '');
    if (info.reference) { $('ref-card').hidden = false; $('ref-name').textContent = info.reference; }
  } catch (e) { $('error').textContent = 'health: ' + e; }
  await run();
})();
</script>
</body></html>
"""
