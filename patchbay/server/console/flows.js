// The map, the list of flows and one flow's page.

import { api, can, needs } from './api.js';
import {
  append, code, emptyRow, errorBox, fill, flowLink, fmtMs, fmtPct, fmtSeconds, h, liveSection, pill, runLink, table, when,
} from './dom.js';
import { drawMap, HEALTHS } from './map.js';
import { fmtRows, reportView, runsTable } from './runs.js';

const HEALTH_TEXT = {
  ok: 'delivering normally', retrying: 'failed attempts waiting for a retry', late: 'a schedule is late',
  paused: 'destination paused (e.g. after 401/403)', failing: 'dead letters in the last hour',
};

// ============================================================================ map
export async function viewMap(root) {
  const holder = h('div', { class: 'map-holder' });
  const conn = h('div');
  append(root,
    h('div', { class: 'title-row' }, h('h1', {}, 'Map'),
      h('p', { class: 'lede' }, 'Which system connects to which, through which flow, and who owns it. '
        + 'Hover for owner and purpose; click an arrow to open its flow.')),
    legend(), holder,
    h('h2', {}, 'Connections'), conn);
  const refresh = liveSection(holder, async () => {
    const [map, flows] = await Promise.all([api('map'), api('flows')]);
    return { map, flows: flows.flows.map((f) => ({ name: f.name, owner: f.owner, purpose: f.purpose })) };
  }, ({ map, flows }) => {
    const byName = new Map(flows.map((f) => [f.name, f]));
    fill(conn, connections(map, byName));
    if (!map.nodes.length) return h('p', { class: 'empty' }, 'No systems yet: add them to systems.yaml.');
    return drawMap(map, byName);
  });
  await refresh();
  return { poll: () => refresh() };
}

function legend() {
  return h('ul', { class: 'legend', 'aria-label': 'Legend' },
    HEALTHS.map((hl) => h('li', {}, h('span', { class: `swatch h-${hl}`, 'aria-hidden': 'true' }),
      pill(hl), h('span', { class: 'muted' }, ` ${HEALTH_TEXT[hl]}`))),
    h('li', { class: 'muted' }, 'Box: a system (kind · owner). Arrow: a flow, from its source to a destination.'));
}

function connections(map, flows) {
  const rows = map.edges.map((e) => h('tr', {},
    h('td', {}, flowLink(e.flow)), h('td', {}, e.source), h('td', {}, e.target),
    h('td', {}, e.destination), h('td', {}, e.trigger), h('td', {}, flows.get(e.flow)?.owner || '—'),
    h('td', {}, pill(e.health))));
  return table(['Flow', 'From', 'To', 'Destination', 'Trigger', 'Owner', 'Health'],
    rows.length ? rows : emptyRow(7, 'No flows yet.'), { class: 'compact' });
}

// ============================================================================ flows
function triggerText(f) {
  if (f.trigger === 'webhook') return h('span', {}, 'webhook ', h('code', { class: 'nowrap' }, f.webhook_path || ''));
  if (f.trigger === 'source') return `source: ${f.source_system}`;
  return f.trigger;
}

function pair(a, b) {
  return h('span', { class: 'nowrap' }, a, h('span', { class: 'muted' }, ' / '), b);
}

export async function viewFlows(root, r) {
  const system = r.query.get('system');
  const body = h('div');
  append(root,
    h('div', { class: 'title-row' }, h('h1', {}, 'Flows'),
      h('p', { class: 'lede' }, 'Each integration: where records come from, where they go, and how it is doing.')),
    system ? h('p', { class: 'notice' }, `Showing the flows that use system ${system}. `,
      h('a', { href: '#/flows' }, 'Show all flows')) : null,
    body);
  const refresh = liveSection(body, () => api('flows'), (data) => {
    const flows = data.flows.filter((f) => !system || (f.source_system || 'hub') === system
      || f.destinations.some((d) => d.system === system));
    const rows = flows.map((f) => {
      const last = f.stats.last_run;
      return h('tr', { 'data-flow': f.name },
        h('td', {}, h('strong', { class: 'nowrap' }, flowLink(f.name)), h('div', { class: 'muted small' }, f.purpose)),
        h('td', {}, triggerText(f)),
        h('td', {}, f.source_system || 'hub', ' → ', f.batch ? f.batch.writes : f.destinations.map((d) => d.system).join(', ')),
        h('td', {}, f.owner),
        h('td', {}, pill(f.health), f.batch?.running ? h('div', { class: 'small', 'data-running': f.batch.running.run_id },
          pill('pending', 'running'), f.batch.running.progress?.share != null
            ? ` ${Math.floor(f.batch.running.progress.share * 100)} %` : '') : null),
        h('td', { class: 'nowrap' }, last ? [pill(last.status), ' ', h('a', { href: `#/runs/${last.id}` }, when(last.received_at))]
          : h('span', { class: 'muted' }, 'never')),
        h('td', { class: 'num' }, pair(String(f.stats.hour.runs), String(f.stats.day.runs))),
        h('td', { class: 'num' }, pair(fmtPct(f.stats.hour.success_rate), fmtPct(f.stats.day.success_rate))),
        h('td', { class: 'num' }, pair(fmtMs(f.stats.hour.p95_latency_ms), fmtMs(f.stats.day.p95_latency_ms))));
    });
    return table(['Flow', 'Trigger', 'From → to', 'Owner', 'Health', 'Last run', 'Runs 1 h / 24 h',
      'Success 1 h / 24 h', 'p95 latency 1 h / 24 h'], rows.length ? rows : emptyRow(9, 'No flows.'), { class: 'flows' });
  });
  await refresh();
  return { poll: () => refresh() };
}

function policyText(p) {
  const retry = p.retry?.schedule?.length ? p.retry.schedule.map(fmtSeconds).join(', ') : 'none';
  return [
    `timeout ${fmtSeconds(p.timeout_s)}`, `concurrency ${p.max_concurrency}`,
    p.rate_limit_per_s ? `rate ≤ ${p.rate_limit_per_s}/s` : null, `retries after ${retry}`,
    p.follow_redirects ? 'follows redirects' : null, `key header ${p.idempotency_header}`,
  ].filter(Boolean).join(' · ');
}

export function stateButton(d, after) {
  const paused = d.state !== 'active';
  const label = paused ? `Resume ${d.name}` : `Pause ${d.name}`;
  const status = h('span', { class: 'small', role: 'status' });
  const btn = h('button', needs('destinations:write', {
    type: 'button', class: paused ? 'primary' : '', 'data-action': paused ? 'resume' : 'pause',
    onclick: async () => {
      btn.disabled = true;
      try {
        const res = await api(`flows/${encodeURIComponent(d.flow)}/destinations/${encodeURIComponent(d.name)}/`
          + (paused ? 'resume' : 'pause'), { method: 'POST' });
        status.textContent = res.changed ? ` ${res.state}` : ` already ${res.state}`;
        await after();
      } catch (err) {
        fill(status, errorBox(err));
        btn.disabled = false;
      }
    },
  }), label);
  return [btn, status];
}

// ---------------------------------------------------------------------------- running a flow on demand
const PHASE_TEXT = { preparing: 'Preparing (columns, drift, counts)…', copying: 'Copying…',
  committing: 'Committing…', recording: 'Recording the report…', done: 'Done.' };

/** A batch run's progress: a bar when the total is known, rows, rows/s and ETA. */
export function progressView(run) {
  const p = run.progress || { read: 0, total: null, rows_per_s: 0, eta_s: null };
  const share = p.total ? Math.min(1, p.read / p.total) : null;
  return h('div', { class: 'run-progress', 'data-run': run.run_id, 'data-phase': run.phase },
    h('p', {}, pill('pending', 'running'), ' ', PHASE_TEXT[run.phase] || run.phase, ' ', h('span', { class: 'muted small' },
      `run ${run.run_id}, started by ${run.trigger}`)),
    h('progress', share === null ? { 'aria-label': 'Rows read' }
      : { max: p.total, value: p.read, 'aria-label': 'Rows read' }),
    h('p', { class: 'small', role: 'status' }, share === null ? `${fmtRows(p.read)} rows`
      : `${Math.floor(share * 100)} % · ${fmtRows(p.read)} / ${fmtRows(p.total)} rows`,
    ` · ${fmtRows(Math.round(p.rows_per_s))} rows/s`, p.eta_s !== null && p.eta_s !== undefined ? ` · ETA ${fmtSeconds(p.eta_s)}` : ''));
}

function runPanel(f, after) {
  const name = f.name;
  const out = h('div', { class: 'run-live' });
  const msg = h('span', { role: 'status', class: 'small' });
  let following = null;
  let reported = null; // the run whose report is shown: the live refresh leaves it until another run exists
  const follow = async (id) => {
    following = id;
    while (following === id) {
      let run;
      try { run = await api(`flows/${encodeURIComponent(name)}/runs/${encodeURIComponent(id)}`); } catch (err) {
        fill(msg, errorBox(err)); return;
      }
      if (run.status !== 'running') {
        fill(out, reportView(run.report), h('p', {}, runLink(run.run_id), ' · the run\'s page has the report'));
        reported = run.run_id;
        following = null;
        await after();
        return;
      }
      fill(out, progressView(run));
      await new Promise((res) => { setTimeout(res, 300); });
    }
  };
  if (f.batch) {
    const accept = h('input', { type: 'checkbox', id: 'run-accept' });
    const btn = h('button', needs('runs:start', {
      type: 'button', class: 'primary', 'data-action': 'run',
      onclick: async () => {
        btn.disabled = true;
        msg.textContent = '';
        try {
          const run = await api(`flows/${encodeURIComponent(name)}/runs`, { method: 'POST', body: { accept_schema: accept.checked } });
          await follow(run.run_id);
        } catch (err) { fill(msg, errorBox(err)); }
        btn.disabled = !can('runs:start');
      },
    }), 'Run now');
    const update = (fl) => {
      const b = fl.batch;
      if (following || (reported && !b.running && b.last_run?.run_id === reported)) return;
      if (b.running) fill(out, progressView(b.running));
      else if (b.last_run) {
        fill(out, h('p', {}, 'Last run ', pill(b.last_run.status === 'ok' ? 'delivered' : 'dead', b.last_run.status), ' ',
          runLink(b.last_run.run_id), ' ', when(b.last_run.at)),
        b.last_run.error ? h('p', { class: 'notice bad' }, b.last_run.error) : null);
      } else fill(out, h('p', { class: 'muted' }, 'No run yet.'));
    };
    update(f);
    return { update, el: h('section', { class: 'run-panel', 'aria-label': 'Run' }, h('h2', {}, 'Run'),
      h('p', { class: 'muted small' }, `Reads ${f.batch.reads} and writes ${f.batch.writes} in one transaction; `
        + 'one run at a time.'),
      h('div', { class: 'actions' }, btn, h('label', { for: 'run-accept', class: 'small' }, accept,
        ' accept schema changes'), msg), out) };
  }
  const data = h('textarea', { id: 'run-data', rows: 4, cols: 60, 'aria-label': 'Event (JSON)', placeholder: '{"email": "ada@example.com"}' });
  const btn = h('button', needs('runs:start', {
    type: 'button', class: 'primary', 'data-action': 'run',
    onclick: async () => {
      let body;
      try { body = { data: JSON.parse(data.value) }; } catch (err) { msg.textContent = `Not JSON: ${err.message}`; return; }
      btn.disabled = true;
      try {
        const run = await api(`flows/${encodeURIComponent(name)}/runs`, { method: 'POST', body });
        fill(msg, 'Stored: ', runLink(run.run_id), ` (${run.status})`);
        await after();
      } catch (err) { fill(msg, errorBox(err)); }
      btn.disabled = !can('runs:start');
    },
  }), 'Run');
  return { update: () => {}, el: h('section', { class: 'run-panel', 'aria-label': 'Run' }, h('h2', {}, 'Run'),
    h('p', { class: 'muted small' }, 'Runs one event through this flow (it has `manual: true`); it is stored and delivered like any other.'),
    h('label', { for: 'run-data', class: 'small' }, 'Event (JSON)'), data, h('div', { class: 'actions' }, btn, msg)) };
}

export async function viewFlow(root, r) {
  const name = r.parts[1];
  const head = h('div');
  const runBox = h('div');
  const dests = h('div');
  const stats = h('div');
  const runs = h('div');
  const defn = h('div');
  const destsHead = h('h2', {}, 'Destinations');
  append(root, head, runBox, h('h2', {}, 'Last hour and day'), stats, destsHead, dests,
    h('div', { class: 'title-row' }, h('h2', {}, 'Recent runs'),
      h('a', { href: `#/runs?flow=${encodeURIComponent(name)}` }, 'Search all runs of this flow →')),
    runs, h('h2', {}, 'Definition'), defn);
  let defnShown = false;
  let panel = null;
  const refreshFlow = liveSection(head, () => api(`flows/${encodeURIComponent(name)}`), (f) => {
    destsHead.hidden = dests.hidden = Boolean(f.batch); // a batch flow writes its table, not destinations
    if (!panel && (f.batch || f.definition?.trigger?.manual)) {
      panel = runPanel(f, () => refreshFlow(true));
      fill(runBox, panel.el);
    } else if (panel) panel.update(f);
    fill(stats, statsCards(f.stats));
    fill(runs, runsTable(f.recent_runs, false));
    if (!defnShown) {
      defnShown = true;
      fill(defn, h('p', { class: 'muted small' },
        `Read-only, as loaded from ${f.file}:${f.line}; credentials are shown by reference or redacted.`),
      code(f.definition));
    }
    const sched = f.schedule;
    return [
      h('div', { class: 'title-row' }, h('h1', {}, f.name), pill(f.health),
        f.enabled ? null : pill('paused', 'disabled')),
      h('p', { class: 'lede' }, f.purpose),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Owner'), h('dd', {}, f.owner),
        h('dt', {}, 'Trigger'), h('dd', {}, triggerText(f)),
        h('dt', {}, 'From'), h('dd', {}, f.source_system || 'the hub (schedule or manual)'),
        h('dt', {}, 'To'), h('dd', {}, f.batch ? f.batch.writes
          : f.destinations.filter((d) => !d.call).map((d) => `${d.name} (${d.system})`).join(', ')),
        f.destinations.some((d) => d.call) ? [h('dt', {}, 'Asks'), h('dd', {},
          f.destinations.filter((d) => d.call).map((d) => `${d.call} (${d.system})`).join(', '))] : null,
        h('dt', {}, 'Record key'), h('dd', {}, f.record_key ? h('code', {}, f.record_key) : '—'),
        sched ? [h('dt', {}, 'Schedule'), h('dd', {},
          sched.cron ? `cron ${sched.cron} (${sched.timezone})` : `every ${fmtSeconds(sched.every_s)}`,
          ' · last ', when(sched.last_started_at), sched.last_status ? ` (${sched.last_status})` : '',
          ' · next ', when(sched.next_due_at),
          sched.late_s ? [' ', pill('late', `late by ${fmtSeconds(sched.late_s)}`)] : '')] : null,
        h('dt', {}, 'File'), h('dd', {}, h('code', {}, `${f.file}:${f.line}`))),
    ];
  });
  const refreshDests = liveSection(dests, () => api('destinations'), (data) => {
    const rows = data.destinations.filter((d) => d.flow === name).map((d) => h('tr', { 'data-destination': d.name },
      h('td', {}, h('strong', {}, d.name), d.when ? h('div', { class: 'muted small' }, 'when ', h('code', {}, d.when)) : null,
        d.call ? h('div', { class: 'muted small' }, `call step ${d.call}: runs wait on its answer`) : null),
      h('td', {}, `${d.system} (${d.kind})`),
      h('td', {}, pill(d.state === 'active' ? 'active' : d.state, d.state),
        d.reason ? h('div', { class: 'small' }, d.reason) : null,
        d.since && d.state !== 'active' ? h('div', { class: 'muted small' }, 'since ', when(d.since)) : null),
      h('td', {}, pill(d.health),
        d.order_by ? h('div', { class: 'muted small' }, 'in order by ', h('code', {}, d.order_by)) : null,
        (d.held_keys || []).map((k) => h('div', { class: 'small', 'data-held-key': k.key }, pill('held', k.status), ' ', k.reason))),
      h('td', { class: 'num' }, `${d.pending} / ${d.retrying} / ${d.dead}`),
      h('td', { class: 'small' }, policyText(d.policy)),
      h('td', { class: 'nowrap' }, stateButton(d, () => Promise.all([refreshDests(true), refreshFlow(true)])))));
    return table(['Destination', 'System', 'State', 'Health', 'Pending / retrying / dead', 'Delivery policy', ''],
      rows);
  });
  await Promise.all([refreshFlow(), refreshDests()]);
  return { poll: () => Promise.all([refreshFlow(), refreshDests()]) };
}

function statsCards(st) {
  const card = (title, w) => h('section', { class: 'card', 'aria-label': title },
    h('h3', {}, title),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Runs'), h('dd', {}, String(w.runs), ' ', h('span', { class: 'muted small' },
        Object.entries(w.by_status).map(([k, v]) => `${v} ${k}`).join(', '))),
      h('dt', {}, 'Success rate'), h('dd', {}, fmtPct(w.success_rate)),
      h('dt', {}, 'p95 latency'), h('dd', {}, fmtMs(w.p95_latency_ms), h('span', { class: 'muted small' }, ' per attempt')),
      h('dt', {}, 'p95 end to end'), h('dd', {}, fmtMs(w.p95_end_to_end_ms))));
  return h('div', { class: 'cards' }, card('Last hour', st.hour), card('Last 24 hours', st.day),
    h('section', { class: 'card', 'aria-label': 'Last run' }, h('h3', {}, 'Last run'),
      st.last_run ? h('p', {}, pill(st.last_run.status), ' ', runLink(st.last_run.id), ' ', when(st.last_run.received_at),
        st.last_run.record_key ? h('div', { class: 'small' }, st.last_run.record_key) : null)
        : h('p', { class: 'muted' }, 'No runs yet.')));
}

