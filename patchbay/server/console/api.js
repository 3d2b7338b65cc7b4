// The API client: the token of this tab, every call with `Authorization: Bearer`, errors as ApiError.

import { shortId } from './dom.js';

const TOKEN_KEY = 'patchbay.token';

/** Who is signed in: the token (kept in this tab's session storage) and what /whoami says about it. */
export const session = { token: sessionStorage.getItem(TOKEN_KEY), me: null };
let unauthorized = () => {};

/** Called with the reason when the hub answers 401: the console goes back to the sign-in page. */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

export function keepToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  session.token = token;
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  session.token = null;
  session.me = null;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error || 'http_error';
  }
}

export async function api(path, { method = 'GET', body, params } = {}) {
  const url = new URL(`/api/v1/${path}`, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') url.searchParams.set(k, v);
  }
  const headers = { Authorization: `Bearer ${session.token}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET') headers['X-Patchbay-Console'] = '1'; // says who started a run (`trigger: console`)
  let res;
  try {
    res = await fetch(url, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store', credentials: 'omit', redirect: 'error',
    });
  } catch {
    throw new ApiError(0, { error: 'unreachable', message: 'the hub did not answer: is `patchbay serve` running?' });
  }
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (res.status === 401) {
    unauthorized(`The hub refused the token: ${data?.message || 'unauthorized'}.`);
    throw new ApiError(401, data);
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export const can = (scope) => Boolean(session.me && (session.me.scopes.includes('admin') || session.me.scopes.includes(scope)));

export function needs(scope, attrs) {
  return can(scope) ? attrs : { ...attrs, disabled: true, title: `needs a token with scope ${scope}` };
}

/** A replay's answer in one sentence. */
export function replayReport(res) {
  const parts = [`Requeued ${res.requeued.length} of ${res.matched}.`];
  if (res.still_invalid.length) parts.push(`Still invalid: ${res.still_invalid.map((x) => `${shortId(x.id)} ${x.reason}`).join('; ')}.`);
  if (res.skipped.length) parts.push(`Skipped: ${res.skipped.map((x) => `${shortId(x.id)} ${x.reason}`).join('; ')}.`);
  return parts.join(' ');
}
