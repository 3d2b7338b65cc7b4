// Identities: one entity across systems ("where is ada@example.com and what does each system say"),
// the conflict log with its decisions, and the review queue.

import { api, can } from './api.js';
import { append, emptyRow, errorBox, fill, go, h, liveSection, pill, table, when } from './dom.js';

const show = (v) => (v === undefined ? '—' : JSON.stringify(v));

function identityCard(entity, ident) {
  const systems = Object.keys(ident.systems).sort();
  const rows = Object.entries(entity.fields).map(([f, rule]) => {
    const g = ident.golden[f];
    return h('tr', { 'data-field': f },
      h('th', { scope: 'row' }, f),
      h('td', { class: 'mono' }, g ? show(g.value) : '—', g && g.hold ? h('span', { class: 'muted' }, ' (held)') : null),
      h('td', {}, rule),
      systems.map((s) => {
        const seen = ident.systems[s].seen[f];
        return h('td', { 'data-system': s, class: 'mono' }, seen ? show(seen.value) : '—',
          seen ? h('span', { class: 'muted small' }, ' ', when(seen.at)) : null);
      }));
  });
  return h('section', { class: 'identity', 'data-identity': ident.id, 'aria-label': `Identity ${ident.id}` },
    h('h2', {}, ident.id, ' ', pill(ident.status === 'active' ? 'ok' : ident.status, ident.status)),
    h('p', {}, systems.map((s, i) => [i ? ' · ' : '', h('strong', {}, s), ' id ',
      h('span', { class: 'mono', 'data-record': s }, ident.systems[s].id || (ident.systems[s].pending ? 'create in flight' : '—'))])),
    table(['Field', 'Agreed', 'Owner or rule', ...systems], rows, { class: 'identity-fields' }));
}

export async function viewIdentities(root, r) {
  const entities = (await api('entities')).entities;
  const q = r.query.get('q') || '';
  const entName = r.query.get('entity') || (entities[0] && entities[0].name) || '';
  const msg = h('div', { role: 'status', 'aria-live': 'polite' });
  const found = h('div');
  const conflicts = h('div');
  const reviews = h('div');
  const fEnt = h('select', { id: 'i-entity' }, entities.map((e) => h('option', { value: e.name, selected: e.name === entName }, e.name)));
  const fQ = h('input', { id: 'i-q', type: 'search', value: q, placeholder: 'ada@example.com, a record id, idn_…' });
  const search = (ev) => { ev.preventDefault(); go('identities', { entity: fEnt.value, q: fQ.value.trim() }); };
  append(root,
    h('div', { class: 'title-row' }, h('h1', {}, 'Identities'),
      h('p', { class: 'lede' }, 'One entity across systems: its id in each, what each system says per field, who owns '
        + 'it. Conflicts and records waiting for a person below; decisions are written to the systems and audited.')),
    h('form', { class: 'filters', onsubmit: search, 'aria-label': 'Find an entity' },
      h('div', { class: 'field' }, h('label', { for: 'i-entity' }, 'Entity'), fEnt),
      h('div', { class: 'field' }, h('label', { for: 'i-q' }, 'Find'), fQ),
      h('button', { type: 'submit', class: 'primary' }, 'Find')),
    msg,
    found,
    h('section', { 'aria-labelledby': 'conflicts-h' }, h('h2', { id: 'conflicts-h' }, 'Conflicts'), conflicts),
    h('section', { 'aria-labelledby': 'reviews-h' }, h('h2', { id: 'reviews-h' }, 'Review queue'), reviews));

  const entity = entities.find((e) => e.name === entName);
  if (q && entity) {
    try {
      const res = await api(`entities/${encodeURIComponent(entName)}/identities`, { params: { q } });
      fill(found, res.identities.length ? res.identities.map((i) => identityCard(entity, i))
        : h('p', { class: 'muted' }, `No ${entName} matches ${q}.`));
    } catch (err) { fill(found, errorBox(err)); }
  }
  const say = (text, tone = 'good') => fill(msg, h('p', { class: `notice ${tone}` }, text));
  const decide = async (path, body, what) => {
    try {
      const res = await api(path, { method: 'POST', body });
      say(`${what}: done; ${res.result.runs.length} run(s) write it.`);
    } catch (err) { fill(msg, errorBox(err)); }
    await poll(true);
  };
  const refreshConflicts = liveSection(conflicts, async () => (await api('conflicts', { params: { limit: 50 } })).conflicts, (list) => {
    const heads = ['#', 'Entity', 'Field', 'Values', 'Winner', 'Why', 'Status', 'When', ''];
    return table(heads, list.length ? list.map((c) => h('tr', { 'data-conflict': String(c.id) },
      h('td', { class: 'num' }, String(c.id)), h('td', {}, c.entity), h('td', {}, c.field),
      h('td', { class: 'mono' }, c.values.map((v, i) => [i ? '; ' : '', `${v.system}: ${show(v.value)}`])),
      h('td', {}, c.winner || '—'), h('td', {}, c.reason), h('td', {}, pill(c.status === 'open' ? 'paused' : 'ok', c.status)),
      h('td', {}, when(c.at)),
      h('td', { class: 'nowrap' }, c.status !== 'resolved' && can('identities:write')
        ? c.values.map((v) => h('button', { type: 'button', onclick: () => decide(`conflicts/${c.id}/resolve`,
          { take: v.system }, `Conflict ${c.id}`) }, `Keep ${v.system}`)) : null)))
      : emptyRow(heads.length, 'No conflicts.'));
  });
  const refreshReviews = liveSection(reviews, async () => (await api('reviews', { params: { limit: 50 } })).reviews, (list) => {
    const heads = ['#', 'Entity', 'System', 'Record', 'Why', 'Candidates', 'When', ''];
    return table(heads, list.length ? list.map((rv) => h('tr', { 'data-review': String(rv.id) },
      h('td', { class: 'num' }, String(rv.id)), h('td', {}, rv.entity), h('td', {}, rv.system),
      h('td', { class: 'mono' }, rv.record_id), h('td', {}, rv.reason), h('td', { class: 'mono' }, rv.candidates.join(', ')),
      h('td', {}, when(rv.at)),
      h('td', { class: 'nowrap' }, can('identities:write') ? [
        ...rv.candidates.map((c) => h('button', { type: 'button', onclick: () => decide(`reviews/${rv.id}/resolve`,
          { link: c }, `Review ${rv.id}`) }, `Link to ${c}`)),
        h('button', { type: 'button', onclick: () => decide(`reviews/${rv.id}/resolve`, { dismiss: true }, `Review ${rv.id}`) }, 'Dismiss'),
      ] : null)))
      : emptyRow(heads.length, 'Nothing waits for a person.'));
  });
  async function poll(force) {
    await Promise.all([refreshConflicts(force), refreshReviews(force)]);
  }
  await poll(true);
  return { poll };
}
