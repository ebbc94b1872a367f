// Types of auth-client.js, the issuer's browser client (served at /sdk/auth-client.js).

/** A user as the issuer returns it. */
export interface User {
  id: string;
  email: string;
  role: string;
}

/** One of the user's active sessions (GET /auth/sessions). */
export interface Session {
  id: string;
  created_at: string;
  last_used_at: string;
  user_agent: string | null;
  ip: string | null;
  /** Whether this is the session of the client that asked. */
  current: boolean;
}

export type AuthErrorCode =
  | "invalid_request"
  | "invalid_credentials"
  | "email_taken"
  | "too_many_requests"
  | "invalid_grant"
  | "invalid_token"
  | "forbidden"
  | "not_found"
  | "temporarily_unavailable"
  /** login() answered 200 but the browser did not store the refresh cookie (page and issuer cross-site). */
  | "cookie_not_stored"
  /** The issuer could not be reached (or CORS refused the page's origin). */
  | "network_error"
  /** A call that needs a session was made while signed out. */
  | "signed_out"
  /** sessions() found this session revoked; the client has signed out. */
  | "session_ended"
  | (string & {});

export class AuthError extends Error {
  readonly name: "AuthError";
  readonly code: AuthErrorCode;
  /** The HTTP status, 0 when no answer came. */
  readonly status: number;
  /** Seconds to wait before trying again (a 429's Retry-After), or null. */
  readonly retryAfter: number | null;
  constructor(code: string, message: string, options?: { status?: number; retryAfter?: number | null });
}

export interface SignedInDetail {
  user: User;
}

export interface SignedOutDetail {
  /** Who was signed in, or null when this tab did not know yet. */
  user: User | null;
  /** signedOut: "logout" | "logoutAll"; sessionExpired: "invalid_grant" | "revoked". */
  reason: string;
}

export interface AuthEventMap {
  /** A session started or was restored (in this tab or, shared, from another). */
  signedIn: CustomEvent<SignedInDetail>;
  /** logout() or logoutAll() here or in another tab. */
  signedOut: CustomEvent<SignedOutDetail>;
  /** The session ended by itself: refresh refused (expired, revoked from another device, reused). */
  sessionExpired: CustomEvent<SignedOutDetail>;
}

export interface AuthClientOptions {
  /** The issuer's URL; default: the origin (and path prefix) this module was loaded from. */
  issuer?: string | URL;
  /** Replaces the global fetch. */
  fetch?: typeof globalThis.fetch;
}

export interface AuthClient {
  /** The issuer's base URL, with a trailing slash. */
  readonly issuer: string;
  /** The signed-in user, or null. */
  readonly user: User | null;
  /** Restores the session (another tab's token, else one cookie refresh); the user or null. */
  init(): Promise<User | null>;
  /** Creates an account; does not sign in. */
  register(email: string, password: string): Promise<User>;
  /** Signs in (cookie transport). Rejects with AuthError, e.g. "invalid_credentials", "cookie_not_stored". */
  login(email: string, password: string): Promise<User>;
  /** Revokes this session and clears the cookie; every tab signs out. */
  logout(): Promise<void>;
  /** Revokes every session of the user on every device; every tab signs out. */
  logoutAll(): Promise<void>;
  /** fetch() with the Bearer token; on 401 invalid_token refreshes once and retries once. */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;
  /** A valid access token, or null when signed out. Kept in memory only. */
  getAccessToken(): Promise<string | null>;
  sessions(): Promise<Session[]>;
  revokeSession(id: string): Promise<void>;
  addEventListener<K extends keyof AuthEventMap>(
    type: K,
    listener: (event: AuthEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof AuthEventMap>(
    type: K,
    listener: (event: AuthEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
}

export function createAuthClient(options?: AuthClientOptions): AuthClient;
