// mlabel audit: review the suspected label errors, decide keep / fix / unknown per tile, download
// the decisions as corrections.csv. No network. User-controlled text enters the page as text only.
"use strict";

const DECISIONS = ["keep", "fix", "unknown"];
const KEYS = {k: "keep", f: "fix", u: "unknown"};
const STEPS = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: "row", ArrowUp: "-row"};
const KINDS = {
  missing: "missing positive? given 0, the model says present",
  spurious: "spurious positive? given 1, the model says absent",
  suggested_positive: "unknown cell the model says is present",
  suggested_negative: "unknown cell the model says is absent",
};
const VALUES = {"1": "1", "0": "0", "-1": "unknown"};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Decisions persist per page (its key is a digest of its tiles) in localStorage; where storage is
// refused (some browsers on file://) they last while the page is open.
function loadDecisions(data) {
  try {
    const saved = JSON.parse(localStorage.getItem(`mlabel-audit:${data.key}`) || "{}");
    return new Map(Object.entries(saved).filter(([i, d]) => DECISIONS.includes(d) && data.tiles[+i])
                                        .map(([i, d]) => [+i, d]));
  } catch (err) { return new Map(); }
}

function saveDecisions(state) {
  try { localStorage.setItem(`mlabel-audit:${state.data.key}`, JSON.stringify(Object.fromEntries(state.decisions))); }
  catch (err) { /* storage refused: nothing to keep */ }
}

// "given: a, b" with the names in `marked` red (the model disagrees) and the tile's own label underlined.
function nameList(title, names, marked, tile, labels) {
  const line = element("div", "names");
  line.append(element("span", "what", `${title}: `));
  if (!names.length) line.append(element("span", "none", "none"));
  names.forEach((j, k) => {
    if (k) line.append(", ");
    const name = element("span", (marked.has(j) ? "bad" : "") + (j === tile.label ? " about" : ""), labels[j]);
    if (marked.has(j)) name.title = "the given labels and the model disagree";
    line.append(name);
  });
  return line;
}

// The folder every image id starts with ("" when none): tiles show the ids after it.
function commonFolder(images) {
  let prefix = images.length ? images[0] : "";
  for (const image of images) {
    let k = 0;
    while (k < prefix.length && prefix[k] === image[k]) k++;
    prefix = prefix.slice(0, k);
  }
  return prefix.slice(0, prefix.lastIndexOf("/") + 1);
}

function caption(tile, labels, folder) {
  const given = new Set(tile.given), unknown = new Set(tile.unknown), predicted = new Set(tile.predicted);
  const cap = element("figcaption");
  cap.append(element("div", "image", tile.image.slice(folder.length)),
    element("div", "cell", `#${tile.rank} ${labels[tile.label]}`),
    element("div", "kind", KINDS[tile.kind]),
    element("div", "figures", `given ${VALUES[tile.given_value]}, p = ${tile.probability.toFixed(3)}, ` +
                              `score ${tile.score.toPrecision(3)}`),
    nameList("given", tile.given, new Set(tile.given.filter(j => !predicted.has(j))), tile, labels),
    nameList("unknown", tile.unknown, new Set(), tile, labels),
    nameList("model", tile.predicted, new Set(tile.predicted.filter(j => !given.has(j) && !unknown.has(j))),
             tile, labels));
  return cap;
}

function buttons(tile) {
  const row = element("div", "decide"), fixed = tile.kind === "spurious" || tile.kind === "suggested_negative" ? 0 : 1;
  const text = {keep: "keep", fix: `fix \u2192 ${fixed}`, unknown: "unknown"};
  const help = {keep: `keep the given value (${VALUES[tile.given_value]})  [k]`, fix: `set the cell to ${fixed}  [f]`,
                unknown: "mark the cell unknown (-1)  [u]"};
  for (const decision of DECISIONS) {
    const button = element("button", decision, text[decision]);
    Object.assign(button, {type: "button", title: help[decision]});
    button.dataset.decision = decision;
    button.setAttribute("aria-pressed", "false");
    row.append(button);
  }
  return row;
}

function makeTile(data, tile, index, folder) {
  const node = element("figure", `tile kind-${tile.kind}`);
  Object.assign(node, {tabIndex: 0, title: tile.image});
  Object.assign(node.dataset, {index: String(index), label: String(tile.label), kind: tile.kind, decision: ""});
  let picture = element("div", "noimage", "no thumbnail");
  if (tile.thumb !== null) {
    picture = element("img");
    Object.assign(picture, {src: data.thumbs[tile.thumb], alt: tile.image});
  }
  node.append(picture, caption(tile, data.labels, folder), buttons(tile));
  return node;
}

// Options of a filter: the values present among the tiles, with their counts, in `order`.
function fillSelect(select, counts, order, name) {
  for (const value of order) {
    if (!counts.has(value)) continue;
    select.append(new Option(`${name(value)} (${counts.get(value)})`, String(value)));
  }
}

function count(values) {
  const counts = new Map();
  for (const v of values) counts.set(v, (counts.get(v) || 0) + 1);
  return counts;
}

function applyFilters(state) {
  const label = state.label.value, kind = state.kind.value, status = state.status.value;
  let shown = 0;
  state.nodes.forEach((node, i) => {
    const tile = state.data.tiles[i], decision = state.decisions.get(i);
    const ok = (label === "" || tile.label === +label) && (kind === "" || tile.kind === kind) &&
      (status === "" || (status === "undecided" ? !decision : decision === status));
    node.hidden = !ok;
    shown += ok;
  });
  state.count.dataset.shown = String(shown);
  state.count.dataset.decided = String(state.decisions.size);
  state.count.textContent = `${shown} of ${state.nodes.length} tiles shown, ${state.decisions.size} decided`;
}

function paint(state, i) {
  const node = state.nodes[i], decision = state.decisions.get(i) || "";
  node.dataset.decision = decision;
  node.querySelectorAll("button").forEach(b => b.setAttribute("aria-pressed", String(b.dataset.decision === decision)));
}

// Choose `decision` for tile i; choosing the one it has clears it.
function decide(state, i, decision) {
  if (state.decisions.get(i) === decision) state.decisions.delete(i);
  else state.decisions.set(i, decision);
  saveDecisions(state);
  paint(state, i);
  applyFilters(state);
}

// Python's csv.writer (QUOTE_MINIMAL, \r\n): quote a field holding a comma, quote or line break.
function csvField(value) {
  return /[",\r\n]/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}

function correctionsCsv(state) {
  const rows = [["image", "label", "decision"]];
  state.data.tiles.forEach((tile, i) => {
    const decision = state.decisions.get(i);
    if (decision) rows.push([tile.image, state.data.labels[tile.label], decision]);
  });
  return rows.map(row => row.map(csvField).join(",") + "\r\n").join("");
}

function download(state) {
  const link = element("a");
  link.href = URL.createObjectURL(new Blob([correctionsCsv(state)], {type: "text/csv;charset=utf-8"}));
  link.download = "corrections.csv";
  document.body.append(link);
  link.click();
  link.remove();
}

// The shown tile `step` away from `node` (a row: the tiles sharing the first shown tile's top).
function neighbour(state, node, step) {
  const shown = state.nodes.filter(n => !n.hidden), at = shown.indexOf(node);
  const row = shown.filter(n => n.offsetTop === shown[0].offsetTop).length;
  const by = step === "row" ? row : step === "-row" ? -row : step;
  return shown[Math.min(Math.max(at + by, 0), shown.length - 1)];
}

function onKey(state, event) {
  if (event.ctrlKey || event.metaKey || event.altKey || !event.target.closest) return;
  const node = event.target.closest(".tile");
  if (!node) return;
  const decision = KEYS[event.key.toLowerCase()], step = STEPS[event.key];
  if (!decision && !step) return;
  event.preventDefault();
  const next = neighbour(state, node, step || 1);  // after a decision, on to the next tile
  if (decision) decide(state, +node.dataset.index, decision);
  if (next && !next.hidden) next.focus();
}

function start() {
  const data = JSON.parse(document.getElementById("audit-data").textContent);
  const byId = id => document.getElementById(id);
  const state = {data, decisions: loadDecisions(data), label: byId("audit-label"), kind: byId("audit-kind"),
                 status: byId("audit-status"), count: byId("audit-count"), nodes: []};
  const folder = commonFolder(data.tiles.map(t => t.image));
  state.nodes = data.tiles.map((tile, i) => makeTile(data, tile, i, folder));
  byId("audit-folder").textContent = folder ? `Images in ${folder}.` : "";
  byId("tiles").append(...state.nodes);
  fillSelect(state.label, count(data.tiles.map(t => t.label)), data.labels.keys(), j => data.labels[j]);
  fillSelect(state.kind, count(data.tiles.map(t => t.kind)), Object.keys(KINDS), k => k.replace("_", " "));
  byId("audit-apply").textContent = data.apply;
  for (const select of [state.label, state.kind, state.status]) select.addEventListener("change", () => applyFilters(state));
  byId("tiles").addEventListener("click", event => {
    const button = event.target.closest("button[data-decision]");
    if (button) decide(state, +button.closest(".tile").dataset.index, button.dataset.decision);
  });
  document.addEventListener("keydown", event => onKey(state, event));
  byId("audit-download").addEventListener("click", () => download(state));
  state.nodes.forEach((_, i) => paint(state, i));
  applyFilters(state);
  window.auditCorrections = () => correctionsCsv(state);  // for scripts and tests: the CSV as it would download
  document.body.dataset.ready = "true";
}

start();
