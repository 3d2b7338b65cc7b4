// The map: systems as nodes in layers (sources left, destinations right), flows as arrows.
//
// A small layered ("Sugiyama") layout: break cycles (a two-way sync draws one arrow backwards),
// give each system the longest path from a source as its column, route arrows that skip columns
// through invisible waypoints, order each column to cut crossings (barycentres), then place nodes
// as close as possible to their neighbours without overlapping (isotonic regression), and put
// each arrow's label on its own curve where it overlaps no other label and no node.

import { s } from './dom.js';

export const HEALTHS = ['ok', 'retrying', 'late', 'paused', 'failing'];
const NODE_H = 62;
const PORT_GAP = 14; // vertical room per arrow end on a node's side
const NODE_GAP = 30; // between nodes in a column
const WAY_GAP = 16; // between waypoints of arrows that skip a column
const MARGIN = 20;
const LABEL_H = 20;
const NAME_FONT = '600 13px';
const SMALL_FONT = '11px';
const LABEL_FONT = '600 11px';

let canvas = null;

/** Text width in px with the page's font family, measured on a canvas. */
export function measure(text, font = SMALL_FONT) {
  canvas = canvas || document.createElement('canvas');
  const ctx = canvas.getContext('2d');
  ctx.font = `${font} ${getComputedStyle(document.body).fontFamily}`;
  return ctx.measureText(text).width;
}

function fit(text, font, max) {
  if (measure(text, font) <= max) return text;
  let t = text;
  while (t.length > 1 && measure(`${t}…`, font) > max) t = t.slice(0, -1);
  return `${t}…`;
}

export function edgeLabel(e) {
  const dest = e.call ? `asks ${e.call}` : e.destination;
  const name = dest && dest !== e.target ? `${e.flow} · ${dest}` : e.flow;
  return e.health === 'ok' ? name : `${name} · ${e.health}`;
}

function nodeLines(n) {
  const kind = n.kind === 'hub' ? 'the hub: schedules, manual runs' : n.kind || 'calls our webhooks';
  return { name: n.id, meta: n.owner ? `${kind} · ${n.owner}` : kind, health: n.health };
}

/** Isotonic regression (pool adjacent violators): the non-decreasing sequence closest to `b`. */
function isotonic(b) {
  const blocks = [];
  for (const v of b) {
    blocks.push({ sum: v, n: 1 });
    while (blocks.length > 1) {
      const [p, q] = blocks.slice(-2);
      if (p.sum / p.n <= q.sum / q.n) break;
      blocks.splice(-2, 2, { sum: p.sum + q.sum, n: p.n + q.n });
    }
  }
  return blocks.flatMap((bl) => Array(bl.n).fill(bl.sum / bl.n));
}

function crossings(layers, pos, segs) {
  let n = 0;
  for (let L = 0; L + 1 < layers.length; L++) {
    const ss = segs.filter((sg) => sg.layer === L);
    for (let i = 0; i < ss.length; i++) {
      for (let j = i + 1; j < ss.length; j++) {
        const a = ss[i], b = ss[j];
        if ((pos.get(a.a) - pos.get(b.a)) * (pos.get(a.b) - pos.get(b.b)) < 0) n++;
      }
    }
  }
  return n;
}

function bezierAt(p, q, t) {
  const dx = (q.x - p.x) / 2;
  const c1 = { x: p.x + dx, y: p.y }, c2 = { x: q.x - dx, y: q.y };
  const u = 1 - t;
  return {
    x: u * u * u * p.x + 3 * u * u * t * c1.x + 3 * u * t * t * c2.x + t * t * t * q.x,
    y: u * u * u * p.y + 3 * u * u * t * c1.y + 3 * u * t * t * c2.y + t * t * t * q.y,
  };
}

function pathThrough(points) {
  let d = `M${points[0].x},${points[0].y}`;
  for (let i = 1; i < points.length; i++) {
    const p = points[i - 1], q = points[i], dx = (q.x - p.x) / 2;
    d += ` C${p.x + dx},${p.y} ${q.x - dx},${q.y} ${q.x},${q.y}`;
  }
  return d;
}

const overlap = (a, b) => Math.max(0, Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x))
  * Math.max(0, Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y));

/** Positions for the map's nodes, arrows and labels. Pure but for text measurement. */
export function layout(mapNodes, mapEdges) {
  const nodes = [...mapNodes];
  const known = new Set(nodes.map((n) => n.id));
  for (const e of mapEdges) {
    for (const id of [e.source, e.target]) {
      if (!known.has(id)) {
        known.add(id);
        nodes.push({ id, kind: null, owner: null, purpose: null, health: 'ok' });
      }
    }
  }
  const ids = nodes.map((n) => n.id);
  const edges = mapEdges.filter((e) => e.source !== e.target);
  const loops = mapEdges.filter((e) => e.source === e.target);

  // 1. Break cycles: a depth-first search from the sources; an edge back into the path is reversed.
  const out = new Map(ids.map((id) => [id, []]));
  const indeg = new Map(ids.map((id) => [id, 0]));
  for (const e of edges) {
    out.get(e.source).push(e);
    indeg.set(e.target, indeg.get(e.target) + 1);
  }
  const seen = new Map();
  const back = new Set();
  const dfs = (v) => {
    seen.set(v, 1);
    for (const e of out.get(v)) {
      const st = seen.get(e.target);
      if (st === 1) back.add(e);
      else if (!st) dfs(e.target);
    }
    seen.set(v, 2);
  };
  for (const v of [...ids].sort((a, b) => (indeg.get(a) > 0) - (indeg.get(b) > 0))) if (!seen.get(v)) dfs(v);
  const dir = edges.map((e) => (back.has(e) ? { e, from: e.target, to: e.source, rev: true }
    : { e, from: e.source, to: e.target, rev: false }));

  // 2. Columns: the longest path from a source.
  const layer = new Map(ids.map((id) => [id, 0]));
  const inc = new Map(ids.map((id) => [id, 0]));
  for (const d of dir) inc.set(d.to, inc.get(d.to) + 1);
  const queue = ids.filter((id) => inc.get(id) === 0);
  while (queue.length) {
    const v = queue.shift();
    for (const d of dir) {
      if (d.from !== v) continue;
      layer.set(d.to, Math.max(layer.get(d.to), layer.get(v) + 1));
      inc.set(d.to, inc.get(d.to) - 1);
      if (inc.get(d.to) === 0) queue.push(d.to);
    }
  }

  // 3. Waypoints for arrows that skip columns; `segs` are the one-column hops.
  const nLayers = Math.max(0, ...layer.values()) + 1;
  const layers = Array.from({ length: nLayers }, () => []);
  const vert = new Map(); // id -> {id, layer, real, h, w, node}
  const byId = new Map(nodes.map((n) => [n.id, n]));
  for (const id of ids) {
    vert.set(id, { id, layer: layer.get(id), real: true, node: byId.get(id) });
    layers[layer.get(id)].push(id);
  }
  const segs = [];
  dir.forEach((d, i) => {
    d.chain = [d.from];
    for (let L = layer.get(d.from) + 1; L < layer.get(d.to); L++) {
      const w = `~${i}~${L}`;
      vert.set(w, { id: w, layer: L, real: false, h: 0, w: 0 });
      layers[L].push(w);
      d.chain.push(w);
    }
    d.chain.push(d.to);
    for (let k = 0; k + 1 < d.chain.length; k++) {
      segs.push({ a: d.chain[k], b: d.chain[k + 1], layer: layer.get(d.from) + k, d, k });
    }
  });
  const up = new Map([...vert.keys()].map((v) => [v, []]));
  const down = new Map([...vert.keys()].map((v) => [v, []]));
  for (const sg of segs) {
    down.get(sg.a).push(sg.b);
    up.get(sg.b).push(sg.a);
  }

  // 4. Connected groups of systems are drawn one below the other, the biggest first.
  const parent = new Map([...vert.keys()].map((v) => [v, v]));
  const find = (v) => (parent.get(v) === v ? v : find(parent.get(v)));
  for (const sg of segs) parent.set(find(sg.a), find(sg.b));
  const size = new Map();
  for (const v of vert.keys()) size.set(find(v), (size.get(find(v)) || 0) + 1);
  const roots = [...new Set(ids.map(find))].sort((a, b) => size.get(b) - size.get(a));
  const comp = new Map([...vert.keys()].map((v) => [v, roots.indexOf(find(v))]));

  // 5. Order each column by the mean position of its neighbours, then swap neighbours while that
  // removes crossings. Small maps are cheap: start again from a few shuffled orders (seeded, so the
  // same map is always drawn the same way) and keep the order with the fewest crossings.
  const pos = new Map();
  const index = () => layers.forEach((col) => col.forEach((v, i) => pos.set(v, i)));
  let seed = 7;
  const random = () => {
    seed = (seed * 16807) % 2147483647;
    return seed / 2147483647;
  };
  const start = layers.map((col) => [...col].sort((a, b) => comp.get(a) - comp.get(b)));
  let best = start.map((col) => [...col]);
  start.forEach((col, L) => { layers[L] = [...col]; });
  index();
  let bestX = crossings(layers, pos, segs);
  const tries = segs.length > 200 ? 1 : 12;
  for (let attempt = 0; attempt < tries && bestX > 0; attempt++) {
    start.forEach((col, L) => {
      const c = [...col];
      if (attempt > 0) {
        for (let i = c.length - 1; i > 0; i--) {
          const j = Math.floor(random() * (i + 1));
          [c[i], c[j]] = [c[j], c[i]];
        }
        c.sort((a, b) => comp.get(a) - comp.get(b));
      }
      layers[L] = c;
    });
    index();
    for (let it = 0; it < 8 && bestX > 0; it++) {
      const downward = it % 2 === 0;
      const cols = downward ? [...layers.keys()].slice(1) : [...layers.keys()].reverse().slice(1);
      const nb = downward ? up : down;
      for (const L of cols) {
        const bary = new Map(layers[L].map((v) => {
          const ns = nb.get(v);
          return [v, ns.length ? ns.reduce((acc, n) => acc + pos.get(n), 0) / ns.length : pos.get(v)];
        }));
        layers[L].sort((a, b) => comp.get(a) - comp.get(b) || bary.get(a) - bary.get(b));
        layers[L].forEach((v, i) => pos.set(v, i));
      }
      let x = crossings(layers, pos, segs);
      for (let pass = 0, improved = true; improved && pass < 8; pass++) {
        improved = false;
        for (const col of layers) {
          for (let i = 0; i + 1 < col.length; i++) {
            if (comp.get(col[i]) !== comp.get(col[i + 1])) continue;
            [col[i], col[i + 1]] = [col[i + 1], col[i]];
            pos.set(col[i], i);
            pos.set(col[i + 1], i + 1);
            const y = crossings(layers, pos, segs);
            if (y < x) {
              x = y;
              improved = true;
            } else {
              [col[i], col[i + 1]] = [col[i + 1], col[i]];
              pos.set(col[i], i);
              pos.set(col[i + 1], i + 1);
            }
          }
        }
      }
      if (x < bestX) {
        bestX = x;
        best = layers.map((col) => [...col]);
      }
    }
  }
  best.forEach((col, L) => { layers[L] = col; });
  index();

  // 6. Sizes: wide enough for the texts, tall enough for one port per arrow end.
  const ports = new Map(ids.map((id) => [id, { in: [], out: [] }]));
  for (const d of dir) {
    ports.get(d.from).out.push(d);
    ports.get(d.to).in.push(d);
  }
  for (const id of ids) {
    const v = vert.get(id);
    const t = nodeLines(v.node);
    v.lines = t;
    v.w = Math.min(240, Math.max(150, measure(t.name, NAME_FONT) + 36, measure(t.meta) + 32));
    const p = ports.get(id);
    v.h = Math.max(NODE_H, (Math.max(p.in.length, p.out.length) + 1) * PORT_GAP);
  }
  const labelW = Math.max(0, ...mapEdges.map((e) => measure(edgeLabel(e), LABEL_FONT) + 20));
  const perGap = segs.reduce((acc, sg) => { acc[sg.layer] = (acc[sg.layer] || 0) + 1; return acc; }, []);
  const busiest = Math.max(0, ...perGap.filter(Boolean));
  const gap = Math.min(420, Math.max(170, labelW + 70, 60 + 18 * busiest)); // room for labels side by side
  const colX = [];
  let x = MARGIN;
  for (let L = 0; L < nLayers; L++) {
    const w = Math.max(0, ...layers[L].map((v) => vert.get(v).w));
    colX.push({ x, w });
    x += w + gap;
  }
  const width = x - gap + MARGIN;

  // 7. Heights: each vertex near the mean of its neighbours, in column order, never overlapping.
  const cy = new Map();
  const sep = (a, b) => {
    const va = vert.get(a), vb = vert.get(b);
    if (!va.real && !vb.real) return WAY_GAP;
    return va.h / 2 + vb.h / 2 + (va.real && vb.real ? NODE_GAP : WAY_GAP);
  };
  let bottom = MARGIN + LABEL_H - NODE_GAP + (loops.length ? 40 : 0);
  roots.forEach((_, c) => {
    const cols = layers.map((col) => col.filter((v) => comp.get(v) === c)).filter((col) => col.length);
    for (const col of cols) {
      let y = 0;
      col.forEach((v, i) => {
        if (i) y += sep(col[i - 1], v);
        cy.set(v, y);
      });
    }
    for (let it = 0; it < 40; it++) {
      for (const col of it % 2 === 0 ? cols : [...cols].reverse()) {
        const want = col.map((v) => {
          const ns = [...up.get(v), ...down.get(v)];
          return ns.length ? ns.reduce((acc, n) => acc + cy.get(n), 0) / ns.length : cy.get(v);
        });
        const offs = [0];
        for (let i = 1; i < col.length; i++) offs.push(offs[i - 1] + sep(col[i - 1], col[i]));
        const z = isotonic(want.map((w, i) => w - offs[i]));
        col.forEach((v, i) => cy.set(v, z[i] + offs[i]));
      }
    }
    const members = cols.flat();
    const top = Math.min(...members.map((v) => cy.get(v) - vert.get(v).h / 2));
    const shift = bottom + NODE_GAP - top;
    for (const v of members) cy.set(v, cy.get(v) + shift);
    bottom = Math.max(...members.map((v) => cy.get(v) + vert.get(v).h / 2));
  });
  for (const [id, v] of vert) {
    const c = colX[v.layer];
    v.cx = c.x + c.w / 2;
    v.cy = cy.get(id);
    if (v.real) {
      v.x = c.x + (c.w - v.w) / 2;
      v.y = v.cy - v.h / 2;
    }
  }

  // 8. Ports: arrow ends spread along a node's side in the order of where they go.
  const nextY = (d, end) => vert.get(end === 'out' ? d.chain[1] : d.chain[d.chain.length - 2]).cy;
  for (const id of ids) {
    const v = vert.get(id);
    for (const end of ['out', 'in']) {
      const list = [...ports.get(id)[end]].sort((a, b) => nextY(a, end) - nextY(b, end)
        || dir.indexOf(a) - dir.indexOf(b));
      list.forEach((d, i) => {
        const py = v.y + (v.h * (i + 1)) / (list.length + 1);
        d[end] = { x: end === 'out' ? v.x + v.w : v.x, y: py };
      });
    }
  }
  const placed = [];
  const nodeRects = ids.map((id) => {
    const v = vert.get(id);
    return { x: v.x - 4, y: v.y - 4, w: v.w + 8, h: v.h + 8 };
  });
  const outEdges = dir.map((d) => {
    const pts = [d.out, ...d.chain.slice(1, -1).map((w) => ({ x: vert.get(w).cx, y: vert.get(w).cy })), d.in];
    return { e: d.e, rev: d.rev, points: d.rev ? [...pts].reverse() : pts };
  });

  // 9. Labels: on their own curve, where they cover no node, no other label and as few other arrows
  // as possible.
  const samples = outEdges.map((oe) => {
    const out = [];
    for (let i = 0; i + 1 < oe.points.length; i++) {
      for (let t = 0; t <= 1; t += 0.04) out.push(bezierAt(oe.points[i], oe.points[i + 1], t));
    }
    return out;
  });
  const order = [...outEdges.keys()].sort((a, b) => outEdges[a].points[0].y - outEdges[b].points[0].y);
  for (const k of order) {
    const oe = outEdges[k];
    const text = edgeLabel(oe.e);
    const w = measure(text, LABEL_FONT) + 20;
    const pts = oe.points;
    const segIdx = [...Array(pts.length - 1).keys()]
      .sort((a, b) => Math.abs(a - (pts.length - 2) / 2) - Math.abs(b - (pts.length - 2) / 2));
    let bestRect = null, bestCost = Infinity;
    outer: for (const t of [0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78]) {
      for (const i of segIdx) {
        const c = bezierAt(pts[i], pts[i + 1], t);
        const r = { x: c.x - w / 2, y: c.y - LABEL_H / 2, w, h: LABEL_H };
        let cost = 1000 * [...placed, ...nodeRects].reduce((acc, o) => acc + overlap(r, o), 0)
          + Math.abs(t - 0.5) * 6;
        samples.forEach((pp, j) => {
          if (j === k) return;
          for (const p of pp) if (p.x > r.x - 2 && p.x < r.x + r.w + 2 && p.y > r.y - 2 && p.y < r.y + r.h + 2) cost++;
        });
        if (cost < bestCost) {
          bestCost = cost;
          bestRect = r;
        }
        if (cost < 0.01) break outer;
      }
    }
    oe.label = { ...bestRect, text };
    placed.push({ x: bestRect.x - 3, y: bestRect.y - 3, w: bestRect.w + 6, h: bestRect.h + 6 });
  }
  for (const e of loops) {
    const v = vert.get(e.source);
    const a = { x: v.x + v.w - 40, y: v.y }, b = { x: v.x + v.w - 12, y: v.y };
    const text = edgeLabel(e);
    const w = measure(text, LABEL_FONT) + 20;
    outEdges.push({
      e, loop: true, points: [a, b],
      d: `M${a.x},${a.y} C${a.x - 10},${a.y - 40} ${b.x + 10},${b.y - 40} ${b.x},${b.y}`,
      label: { x: v.x + v.w - 26 - w / 2, y: v.y - 36 - LABEL_H, w, h: LABEL_H, text },
    });
  }
  let height = bottom + MARGIN;
  for (const oe of outEdges) height = Math.max(height, oe.label.y + LABEL_H + MARGIN);
  const widthAll = Math.max(width, ...outEdges.map((oe) => oe.label.x + oe.label.w + MARGIN));
  return {
    width: Math.ceil(widthAll), height: Math.ceil(height),
    nodes: ids.map((id) => vert.get(id)),
    edges: outEdges.map((oe) => ({ ...oe, d: oe.d || pathThrough(oe.points) })),
  };
}

/** The map as an SVG element. `flows` (by name) give each arrow its owner and purpose. */
export function drawMap(map, flows) {
  const L = layout(map.nodes, map.edges);
  const defs = s('defs', {}, HEALTHS.map((hl) => s('marker', {
    id: `arrow-${hl}`, class: `arrow h-${hl}`, viewBox: '0 0 10 10', refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, markerUnits: 'strokeWidth', orient: 'auto-start-reverse',
  }, s('path', { d: 'M0,1 L10,5 L0,9 z' }))));
  const lines = [], labels = [], boxes = [];
  for (const oe of L.edges) {
    const e = oe.e;
    const f = flows.get(e.flow) || {};
    const tip = [
      `Flow ${e.flow}: ${e.source} → ${e.target} (${e.call ? `call step ${e.call}` : `destination ${e.destination}`})`,
      `Owner: ${f.owner || '—'}`, `Purpose: ${f.purpose || '—'}`,
      `Health: ${e.health}${e.state !== 'active' ? ` (${e.call ? 'call' : 'destination'} ${e.state})` : ''}`,
      ...(e.source_error ? [`Source ${e.source_state}: ${e.source_error}`] : []),
      `Trigger: ${e.trigger}`, 'Click to open the flow.',
    ].join('\n');
    const href = `#/flows/${encodeURIComponent(e.flow)}`;
    lines.push(s('a', { href, tabindex: '-1', class: `edge h-${e.health}`, 'data-edge': e.id },
      s('title', {}, tip),
      s('path', { class: 'edge-hit', d: oe.d }),
      s('path', { class: 'edge-line', d: oe.d, 'marker-end': `url(#arrow-${e.health})` })));
    const lb = oe.label;
    labels.push(s('a', {
      href, class: `edge-label h-${e.health}`, 'data-edge': e.id,
      'aria-label': `flow ${e.flow} from ${e.source} to ${e.target}, ${e.health}`,
    },
    s('title', {}, tip),
    s('rect', { x: lb.x, y: lb.y, width: lb.w, height: lb.h, rx: 10 }),
    s('text', { x: lb.x + lb.w / 2, y: lb.y + lb.h / 2, 'text-anchor': 'middle', 'dominant-baseline': 'central' },
      lb.text)));
  }
  for (const v of L.nodes) {
    const n = v.node;
    const t = v.lines;
    const tip = [
      `System ${n.id}${n.kind ? ` (${n.kind})` : ''}`, `Owner: ${n.owner || '—'}`,
      `Purpose: ${n.purpose || '—'}`, `Health: ${n.health}`, 'Click for the flows that use it.',
    ].join('\n');
    boxes.push(s('a', {
      href: `#/flows?system=${encodeURIComponent(n.id)}`, class: `node h-${n.health}`, 'data-node': n.id,
      'aria-label': `system ${n.id}, ${n.health}`,
    },
    s('title', {}, tip),
    s('rect', { class: 'node-box', x: v.x, y: v.y, width: v.w, height: v.h, rx: 8 }),
    s('rect', { class: 'node-stripe', x: v.x, y: v.y, width: 6, height: v.h, rx: 3 }),
    s('text', { class: 'node-name', x: v.x + 16, y: v.cy - 10 }, fit(t.name, NAME_FONT, v.w - 28)),
    s('text', { class: 'node-meta', x: v.x + 16, y: v.cy + 6 }, fit(t.meta, SMALL_FONT, v.w - 24)),
    s('text', { class: 'node-health', x: v.x + 16, y: v.cy + 21 },
      `${{ ok: '✓', retrying: '↻', late: '◷', paused: '‖', failing: '✕' }[n.health] || '•'} ${n.health}`)));
  }
  const svg = s('svg', {
    class: 'map', viewBox: `0 0 ${L.width} ${L.height}`, width: L.width, height: L.height,
    role: 'group', 'aria-label': 'Map of systems (boxes) and flows (arrows from source to destination)',
  }, defs, s('g', { class: 'edges' }, lines), s('g', { class: 'nodes' }, boxes),
  s('g', { class: 'labels' }, labels));
  svg.style.minWidth = `${Math.round(Math.min(L.width, 900) * 0.85)}px`;
  return svg;
}
