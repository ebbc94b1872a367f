// The issuer's browser client: one dependency-free ES module, served by the issuer at /sdk/auth-client.js.
//
//   import { createAuthClient } from "https://issuer.example.com/sdk/auth-client.js";
//   const auth = createAuthClient();            // the issuer is where this module came from
//   const user = await auth.init();             // the user, or null when signed out
//   const response = await auth.fetch("/api/orders");
//
// How it keeps a session:
// - The access token lives in this object's memory only: never in localStorage, sessionStorage, a cookie
//   or IndexedDB. The refresh token is the issuer's HttpOnly cookie, which no script can read.
// - A reload restores the session with one cookie refresh (init()); invalid_grant there means signed out.
// - Refreshing is single-flight in a tab and serialised across the tabs of the browser with a Web Locks
//   lock. Tabs share every token they obtain over a BroadcastChannel, and a tab that takes the lock first
//   looks for a token another tab already obtained (asking the others, which answer at once) before it
//   refreshes: however many tabs are open, one /auth/refresh goes out per access-token lifetime.
// - A refresh is scheduled shortly before the token expires (with jitter), and fetch() refreshes once and
//   retries once when a server answers 401 invalid_token. A refresh that fails with invalid_grant ends the
//   session (event "sessionExpired") and is never retried; a 429 waits for its Retry-After.
// - Sign-out (logout, logoutAll, a revoked or expired session) reaches every tab.
// - login() checks that the browser kept the refresh cookie (by redeeming it once): a page that is not
//   same-site with the issuer gets an AuthError "cookie_not_stored" instead of a session that silently
//   ends at the next reload.

const REFRESH_PATH = "auth/refresh";
// How long the first tab to take the lock waits for the other tabs to offer a token before refreshing.
const PEER_WAIT_MS = 150;
const MAX_ATTEMPTS = 4; // a refresh that meets 429, 503 or a network failure is tried this often in all
const MAX_BACKOFF_MS = 30_000;

/** An error from the issuer (its `error` code and `error_description`) or from this client. */
export class AuthError extends Error {
  constructor(code, message, { status = 0, retryAfter = null } = {}) {
    super(message);
    this.name = "AuthError";
    /** The issuer's error code (`invalid_credentials`, `email_taken`, ...) or one of this client's:
     * `cookie_not_stored`, `network_error`, `signed_out`, `session_ended`. */
    this.code = code;
    /** The HTTP status, 0 when no answer came. */
    this.status = status;
    /** Seconds to wait before trying again (a 429's Retry-After), or null. */
    this.retryAfter = retryAfter;
  }
}

function defaultIssuer() {
  // This module is served at <issuer>/sdk/auth-client.js: its parent's parent is the issuer (with any path
  // prefix a proxy adds).
  return new URL("..", import.meta.url).href;
}

function baseUrl(issuer) {
  const url = new URL(issuer, globalThis.location?.href);
  if (!url.pathname.endsWith("/")) url.pathname += "/";
  url.search = "";
  url.hash = "";
  return url.href;
}

function randomId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now()}-${Math.random()}`;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Seconds from a Retry-After header: a number of seconds or an HTTP date (RFC 9110 section 10.2.3). */
function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  if (value === null) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not the issuer's error shape (a proxy's page, an empty body)
  }
  const code = typeof body?.error === "string" ? body.error : `http_${response.status}`;
  const message =
    typeof body?.error_description === "string" ? body.error_description : `The issuer answered ${response.status}.`;
  return new AuthError(code, message, { status: response.status, retryAfter: retryAfterSeconds(response) });
}

/** Whether a 401 means "this access token is no good" (RFC 6750 section 3.1). A cross-origin API that does
 * not expose WWW-Authenticate hides the error code: a 401 to a request that carried a token is then taken
 * as invalid_token, which is what a 401 with a token means in RFC 6750. */
function isInvalidToken(response) {
  if (response.status !== 401) return false;
  const challenge = response.headers.get("WWW-Authenticate");
  if (challenge === null) return true;
  const match = /error="?([A-Za-z_]+)"?/.exec(challenge);
  return match === null || match[1] === "invalid_token";
}

/**
 * A client for one issuer. `options.issuer` is the issuer's URL (default: where this module was loaded
 * from). `options.fetch` replaces the global fetch (tests, instrumentation).
 */
export function createAuthClient(options = {}) {
  return new AuthClient(options);
}

class AuthClient {
  #base;
  #fetch;
  #events = new EventTarget();
  #id = randomId();
  #channel = null;
  #lockName;
  // The session, in memory only.
  #token = null;
  #expiresAt = 0; // this browser's clock, milliseconds
  #lifetime = 0; // the token's whole lifetime, milliseconds
  #user = null;
  #refreshing = null; // the refresh in flight in this tab, if any
  #timer = null;
  #initialised = null;
  #waiters = new Set(); // resolvers of askPeers() calls in progress

  constructor({ issuer, fetch: fetchImpl } = {}) {
    this.#base = baseUrl(issuer ?? defaultIssuer());
    this.#fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
    this.#lockName = `issuer-auth:${this.#base}`;
    if (typeof BroadcastChannel === "function") {
      this.#channel = new BroadcastChannel(`issuer-auth:${this.#base}`);
      this.#channel.onmessage = (event) => this.#onMessage(event.data);
    }
  }

  /** The issuer this client talks to (with a trailing slash). */
  get issuer() {
    return this.#base;
  }

  /** The signed-in user ({id, email, role}) or null. */
  get user() {
    return this.#user;
  }

  addEventListener(type, listener, options) {
    this.#events.addEventListener(type, listener, options);
  }

  removeEventListener(type, listener, options) {
    this.#events.removeEventListener(type, listener, options);
  }

  /** Restores the session: from another tab if one has it, else with the refresh cookie. Resolves to the
   * user, or null when signed out. Only the first call (or none, after a login) asks. */
  async init() {
    this.#initialised ??= this.#refresh(null);
    await this.#initialised;
    return this.#user;
  }

  /** Creates an account. Resolves to the new user ({id, email, role}); it does not sign in. */
  async register(email, password) {
    const response = await this.#request("auth/register", { method: "POST", json: { email, password } });
    if (!response.ok) throw await errorFrom(response);
    return (await response.json()).user;
  }

  /** Signs in with the cookie transport and resolves to the user. Rejects with AuthError
   * `invalid_credentials`, `too_many_requests` (see `retryAfter`), or `cookie_not_stored`. */
  async login(email, password) {
    return this.#withLock(async () => {
      const response = await this.#request("auth/login", {
        method: "POST",
        json: { email, password },
        credentials: "include",
      });
      if (!response.ok) throw await errorFrom(response);
      // The login answered 200 and set the cookie, but a browser drops a SameSite=Strict cookie set by a
      // cross-site response, silently. Redeeming it once at once is the only way a script can tell (the
      // cookie is HttpOnly): without it the session would end at the next reload for no visible reason.
      const sentAt = Date.now();
      const confirmed = await this.#post(REFRESH_PATH);
      if (confirmed.status === 401) {
        const page = globalThis.location?.origin ?? "this page";
        this.#clear();
        throw new AuthError(
          "cookie_not_stored",
          `Signed in, but the browser did not keep the issuer's refresh cookie, so the session could not ` +
            `survive a reload. The page (${page}) and the issuer (${new URL(this.#base).origin}) must be ` +
            `same-site (same scheme and registrable domain, e.g. app.example.com and id.example.com; ` +
            `127.0.0.1 and localhost are two sites), or the page must reach the issuer through a path on its ` +
            `own origin. Over plain http the issuer also needs COOKIE_SECURE=false unless the host is localhost.`,
          { status: 401 },
        );
      }
      if (!confirmed.ok) throw await errorFrom(confirmed);
      this.#adopt(await this.#tokenFrom(confirmed, sentAt), { broadcast: true });
      return this.#user;
    });
  }

  /** Signs out here and in every tab: the session is revoked and the cookie cleared. */
  async logout() {
    await this.#withLock(async () => {
      try {
        const response = await this.#post("auth/logout");
        if (!response.ok && response.status !== 204) throw await errorFrom(response);
      } finally {
        this.#signOut("signedOut", "logout", { broadcast: true });
      }
    });
  }

  /** Signs out of every session of the user, on every device (their access tokens die at the issuer at
   * once; verifiers learn it from the revocation feed). */
  async logoutAll() {
    // Not under the lock (fetch() may need to refresh, which takes it): a refresh racing with this one
    // meets a revoked session, and ends it in every tab all the same.
    const response = await this.#bearer("auth/logout-all", { method: "POST", credentials: "include" });
    if (response.ok) this.#signOut("signedOut", "logoutAll", { broadcast: true });
  }

  /** A valid access token (refreshed first when it is missing or about to expire), or null when signed
   * out. Hand it only to servers that should see it; prefer fetch(). */
  async getAccessToken() {
    if (this.#token !== null && Date.now() < this.#expiresAt - 5_000) return this.#token;
    if (this.#user === null && this.#initialised === null) await this.init();
    if (this.#user === null) return null;
    return this.#refresh(this.#token);
  }

  /** fetch() with `Authorization: Bearer <access token>`. On a 401 invalid_token it refreshes once and
   * retries once; a refresh that fails is not retried (the 401 is returned, and the session has ended). */
  async fetch(input, init = {}) {
    const token = await this.getAccessToken();
    // A Request's body can be read once: keep a copy for the retry.
    const spare = input instanceof Request ? input.clone() : null;
    const response = await this.#fetch(input, this.#authorized(input, init, token));
    if (token === null || !isInvalidToken(response)) return response;
    if (init.body instanceof ReadableStream) return response; // a stream cannot be sent twice
    const fresh = await this.#refresh(token);
    if (fresh === null) return response;
    return this.#fetch(spare ?? input, this.#authorized(spare ?? input, init, fresh));
  }

  /** The user's active sessions: [{id, created_at, last_used_at, user_agent, ip, current}]. When this
   * session is no longer among them (revoked from another device) the session ends here, in every tab. */
  async sessions() {
    const response = await this.#bearer("auth/sessions");
    const { sessions } = await response.json();
    if (!sessions.some((session) => session.current)) {
      this.#signOut("sessionExpired", "revoked", { broadcast: true });
      throw new AuthError("session_ended", "This session was revoked.", { status: 200 });
    }
    return sessions;
  }

  /** Revokes one of the user's sessions (a device). Revoking the current one signs out every tab. */
  async revokeSession(id) {
    const current = (await this.sessions()).find((session) => session.current);
    await this.#bearer(`auth/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (current?.id === id) this.#signOut("signedOut", "logout", { broadcast: true });
  }

  // --- internals ---

  async #bearer(path, init = {}) {
    if (this.#user === null && this.#token === null) {
      throw new AuthError("signed_out", "Not signed in.");
    }
    const response = await this.fetch(new URL(path, this.#base), init);
    if (response.ok) return response;
    throw await errorFrom(response);
  }

  #authorized(input, init, token) {
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
    if (token !== null) headers.set("Authorization", `Bearer ${token}`);
    return { ...init, headers };
  }

  async #request(path, { method, json, credentials = "omit" }) {
    const init = { method, credentials, headers: {} };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    }
    try {
      return await this.#fetch(new URL(path, this.#base), init);
    } catch (error) {
      throw new AuthError(
        "network_error",
        `Could not reach the issuer at ${this.#base} (${error?.message ?? error}). If it is up, this page's ` +
          `origin may be missing from its ALLOWED_ORIGINS.`,
      );
    }
  }

  #post(path) {
    return this.#request(path, { method: "POST", credentials: "include" });
  }

  /** The session in a token response. The expiry is counted from when the request was sent, on this
   * browser's clock (the issuer's clock may differ): the token is never believed valid for too long. */
  async #tokenFrom(response, sentAt) {
    const body = await response.json();
    const lifetime = body.expires_in * 1000;
    return { token: body.access_token, expiresAt: sentAt + lifetime, lifetime, user: body.user };
  }

  /** Runs `task` holding the cross-tab lock (or directly where the Web Locks API is missing: an insecure
   * context or an old browser, where tabs fall back to the server's grace window). */
  #withLock(task) {
    if (globalThis.navigator?.locks?.request) return navigator.locks.request(this.#lockName, task);
    return task();
  }

  /** A fresh access token, or null when signed out. `stale` is the token the caller found wanting: a
   * different, fresher one obtained meanwhile (by this tab or another) is used instead of refreshing. */
  #refresh(stale) {
    this.#refreshing ??= this.#withLock(() => this.#refreshHoldingLock(stale)).finally(() => {
      this.#refreshing = null;
    });
    return this.#refreshing;
  }

  async #refreshHoldingLock(stale) {
    if (this.#usable(stale)) return this.#token;
    if (await this.#askPeers(stale)) return this.#token;
    let backoff = 1;
    for (let attempt = 1; ; attempt++) {
      let response = null;
      const sentAt = Date.now();
      try {
        response = await this.#post(REFRESH_PATH);
      } catch (error) {
        if (attempt >= MAX_ATTEMPTS) throw error;
      }
      if (response?.ok) {
        this.#adopt(await this.#tokenFrom(response, sentAt), { broadcast: true });
        return this.#token;
      }
      if (response !== null && response.status !== 429 && response.status !== 503) {
        const error = await errorFrom(response);
        if (error.code !== "invalid_grant") throw error;
        // Missing, expired, revoked or reused: signed out. Never retried.
        if (this.#user !== null || this.#token !== null) {
          this.#signOut("sessionExpired", "invalid_grant", { broadcast: true });
        }
        return null;
      }
      if (attempt >= MAX_ATTEMPTS) throw await errorFrom(response);
      const wait = response === null ? null : retryAfterSeconds(response);
      await sleep(Math.min(MAX_BACKOFF_MS, (wait ?? backoff) * 1000 + Math.random() * 250));
      backoff *= 2;
    }
  }

  /** Whether this tab holds a token other than `stale` that is not due for refresh. */
  #usable(stale) {
    return this.#token !== null && this.#token !== stale && Date.now() < this.#refreshAt();
  }

  /** Asks the other tabs for a token; true when one arrived (adopted by #onMessage) within PEER_WAIT_MS. */
  #askPeers(stale) {
    if (this.#channel === null) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (adopted) => {
        clearTimeout(timer);
        this.#waiters.delete(check);
        resolve(adopted);
      };
      const check = () => {
        if (this.#usable(stale)) done(true);
      };
      const timer = setTimeout(() => done(false), PEER_WAIT_MS);
      this.#waiters.add(check);
      this.#channel.postMessage({ from: this.#id, type: "hello" });
    });
  }

  #onMessage(message) {
    if (message === null || typeof message !== "object" || message.from === this.#id) return;
    switch (message.type) {
      case "hello":
        if (this.#token !== null && Date.now() < this.#refreshAt()) this.#broadcastToken();
        break;
      case "token":
        if (message.expiresAt > this.#expiresAt || this.#user?.id !== message.user?.id) {
          const { token, expiresAt, lifetime, user } = message;
          this.#adopt({ token, expiresAt, lifetime, user });
        }
        for (const check of [...this.#waiters]) check();
        break;
      case "signedOut":
      case "sessionExpired":
        if (this.#user !== null || this.#token !== null) this.#signOut(message.type, message.reason);
        break;
    }
  }

  #broadcastToken() {
    this.#channel?.postMessage({
      from: this.#id,
      type: "token",
      token: this.#token,
      expiresAt: this.#expiresAt,
      lifetime: this.#lifetime,
      user: this.#user,
    });
  }

  #adopt({ token, expiresAt, lifetime, user }, { broadcast = false } = {}) {
    this.#initialised ??= Promise.resolve(token);
    const previous = this.#user;
    this.#token = token;
    this.#expiresAt = expiresAt;
    this.#lifetime = lifetime;
    this.#user = user;
    this.#schedule();
    if (broadcast) this.#broadcastToken();
    if (previous === null || previous.id !== user.id) this.#emit("signedIn", { user });
  }

  /** When the token is due for refresh: a fifth of its lifetime before expiry, at most a minute. */
  #refreshAt() {
    return this.#expiresAt - this.#lead();
  }

  #lead() {
    return Math.min(60_000, this.#lifetime / 5);
  }

  #schedule() {
    clearTimeout(this.#timer);
    // Each tab picks its own moment in the last part of the window; the first to fire refreshes for all.
    const lead = this.#lead();
    const delay = this.#expiresAt - lead - Date.now() + Math.random() * (lead / 2);
    const token = this.#token;
    this.#timer = setTimeout(() => {
      this.#refresh(token).catch(() => {
        // 429s, 503s or no network, MAX_ATTEMPTS times: try again later while the token lasts.
        if (this.#token === token && Date.now() < this.#expiresAt) {
          this.#timer = setTimeout(() => this.#schedule(), 5_000);
        }
      });
    }, Math.max(0, delay));
  }

  #clear() {
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#token = null;
    this.#expiresAt = 0;
    this.#lifetime = 0;
    this.#user = null;
  }

  #signOut(type, reason, { broadcast = false } = {}) {
    this.#initialised ??= Promise.resolve(null);
    const user = this.#user;
    this.#clear();
    if (broadcast) this.#channel?.postMessage({ from: this.#id, type, reason });
    this.#emit(type, { user, reason });
  }

  #emit(type, detail) {
    this.#events.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
