// mlabel report: sortable tables, gallery thumbnails and the threshold explorer. No network.
"use strict";

function sortBy(th) {
  const table = th.closest("table"), i = [...th.parentNode.children].indexOf(th);
  const rows = [...table.rows].slice(1), up = th.dataset.dir !== "up";
  const key = r => { const v = r.cells[i].dataset.v; return v === "" ? NaN : (isNaN(+v) ? v : +v); };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (Number.isNaN(x)) return 1; if (Number.isNaN(y)) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
  th.dataset.dir = up ? "up" : "down";
  rows.forEach(r => table.appendChild(r));
}

function readJson(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}

function showThumbs() {
  const thumbs = readJson("thumbs");
  if (!thumbs) return;
  document.querySelectorAll("img[data-thumb]").forEach(img => { img.src = thumbs[+img.dataset.thumb]; });
}

async function unpack(b64, Type) {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Type(await new Response(stream).arrayBuffer());
}

const TYPES = {uint16: Uint16Array, uint32: Uint32Array};

// One split's data decoded; curve(j) gives label j's cut points (descending) with cumulative
// positives and negatives: at threshold t, with k = number of cuts >= t, TP = tp[k], FP = fp[k].
async function loadSplit(data, mode, bins, nLabels) {
  if (mode === "exact") {
    const [offsets, cuts, tp, fp] = await Promise.all([unpack(data.offsets, Uint32Array),
      unpack(data.cuts, Float32Array), unpack(data.tp, Uint32Array), unpack(data.fp, Uint32Array)]);
    return j => cumulate(cuts.subarray(offsets[j], offsets[j + 1]), tp.subarray(offsets[j], offsets[j + 1]),
                         fp.subarray(offsets[j], offsets[j + 1]));
  }
  const Type = TYPES[data.dtype], pos = await unpack(data.pos, Type), neg = await unpack(data.neg, Type);
  const width = bins + 1, edges = Float64Array.from({length: width}, (_, k) => k / bins);
  return j => {
    const p = pos.subarray(j * width, (j + 1) * width), n = neg.subarray(j * width, (j + 1) * width);
    const keep = []; for (let k = width - 1; k >= 0; k--) if (p[k] || n[k]) keep.push(k);
    return cumulate(keep.map(k => edges[k]), keep.map(k => p[k]), keep.map(k => n[k]));
  };
}

function cumulate(cuts, dtp, dfp) {
  const tp = new Float64Array(cuts.length + 1), fp = new Float64Array(cuts.length + 1);
  for (let k = 0; k < cuts.length; k++) { tp[k + 1] = tp[k] + dtp[k]; fp[k + 1] = fp[k] + dfp[k]; }
  return {cuts, tp, fp, pos: tp[cuts.length], neg: fp[cuts.length]};
}

function countsAt(curve, t) {
  let lo = 0, hi = curve.cuts.length;  // cuts descend: find how many are >= t
  while (lo < hi) { const mid = (lo + hi) >> 1; if (curve.cuts[mid] >= t) lo = mid + 1; else hi = mid; }
  const tp = curve.tp[lo], fp = curve.fp[lo];
  return {k: lo, tp, fp, fn: curve.pos - tp, tn: curve.neg - fp};
}

// scikit-learn's zero_division=0, as in mlabel.evaluate_predictions; null when no target is known.
function ratio(num, den, known) { return known ? (den > 0 ? num / den : 0) : null; }

function figures(c) {
  const known = c.tp + c.fp + c.fn + c.tn > 0;
  return {precision: ratio(c.tp, c.tp + c.fp, known), recall: ratio(c.tp, c.tp + c.fn, known),
          f1: ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, known)};
}

function drawCurve(canvas, curve, marks) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 30;
  const x = r => pad + r * (w - pad - 8), y = p => h - pad - p * (h - pad - 8);
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#bbb"; ctx.strokeRect(x(0), y(1), x(1) - x(0), y(0) - y(1));
  ctx.fillStyle = "#444"; ctx.font = "11px sans-serif";
  ctx.fillText("recall", w / 2 - 15, h - 8); ctx.save(); ctx.translate(10, h / 2 + 20);
  ctx.rotate(-Math.PI / 2); ctx.fillText("precision", 0, 0); ctx.restore();
  if (!curve.pos) { ctx.fillText("no positives", w / 2 - 30, h / 2); return; }
  ctx.strokeStyle = "#1f77b4"; ctx.lineWidth = 1.5; ctx.beginPath();
  for (let k = 1; k < curve.tp.length; k++) {
    const px = x(curve.tp[k] / curve.pos), py = y(curve.tp[k] / (curve.tp[k] + curve.fp[k]));
    k === 1 ? ctx.moveTo(px, py) : ctx.lineTo(px, py);
  }
  ctx.stroke();
  for (const [c, color, size] of marks) {
    if (c.tp + c.fp === 0) continue;
    ctx.fillStyle = color; ctx.beginPath();
    ctx.arc(x(c.tp / curve.pos), y(c.tp / (c.tp + c.fp)), size, 0, 2 * Math.PI); ctx.fill();
  }
}

function fmt(v) { return v === null ? "-" : v.toFixed(6); }

async function startExplorer() {
  const data = readJson("explorer-data");
  if (!data) return;
  const root = document.getElementById("explorer");
  const select = root.querySelector("#explorer-label"), slider = root.querySelector("#explorer-slider");
  const typed = root.querySelector("#explorer-value"), note = root.querySelector("#explorer-note");
  const splits = Object.keys(data.splits), loaded = {};
  for (const s of splits) loaded[s] = await loadSplit(data.splits[s], data.mode, data.bins, data.labels.length);
  const chosen = data.thresholds.slice(), curves = {};
  const step = data.mode === "exact" ? 0.001 : 1 / data.bins;
  slider.step = String(step);
  const snap = t => data.mode === "exact" ? t : Math.round(t * data.bins) / data.bins;
  const curveOf = (s, j) => (curves[s + j] ??= loaded[s](j));

  function update() {
    const j = +select.value, t = chosen[j];
    slider.value = String(t);
    if (document.activeElement !== typed) typed.value = String(t);
    for (const s of splits) {
      const curve = curveOf(s, j), c = countsAt(curve, t), f = figures(c);
      const saved = countsAt(curve, data.thresholds[j]), half = countsAt(curve, 0.5);
      for (const key of ["tp", "fp", "fn", "tn"]) root.querySelector(`#${s}-${key}`).textContent = String(c[key]);
      for (const key of ["precision", "recall", "f1"]) root.querySelector(`#${s}-${key}`).textContent = fmt(f[key]);
      root.querySelector(`#${s}-saved`).textContent = `${fmt(figures(saved).f1)} (${data.thresholds[j].toFixed(4)})`;
      root.querySelector(`#${s}-half`).textContent = fmt(figures(half).f1);
      drawCurve(root.querySelector(`#${s}-curve`), curve,
                [[half, "#999", 3], [saved, "#2ca02c", 4], [c, "#d62728", 5]]);
    }
    const changed = data.labels.filter((_, i) => chosen[i] !== data.thresholds[i]);
    root.querySelector("#explorer-changed").textContent = changed.length ?
      `changed on this page: ${changed.join(", ")}` : "no threshold changed on this page";
    root.querySelector("#explorer-command").textContent = data.tune;
  }

  function choose(value) {
    const t = Number(value);
    if (!Number.isFinite(t) || t < 0 || t > 1) { note.textContent = "a threshold is a number in [0, 1]"; return; }
    chosen[+select.value] = snap(t);
    note.textContent = data.mode === "exact" ? "" :
      `this page holds per-label histograms of the scores (too many to keep each one): thresholds move in steps of ${step}`;
    update();
  }

  select.addEventListener("change", update);
  slider.addEventListener("input", () => choose(slider.value));
  typed.addEventListener("change", () => choose(typed.value));
  root.querySelector("#explorer-reset").addEventListener("click", () => {
    chosen[+select.value] = data.thresholds[+select.value]; update(); });
  root.querySelector("#explorer-download").addEventListener("click", () => {
    const body = {thresholds: Object.fromEntries(data.labels.map((name, i) => [name, chosen[i]]))};
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([JSON.stringify(body, null, 1)], {type: "application/json"}));
    link.download = "thresholds.json"; link.click();
  });
  update();
  root.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", () => {
  showThumbs();
  startExplorer().catch(err => {
    document.getElementById("explorer-note").textContent = `the explorer could not start: ${err}`; });
});
