// The account page (GET /account): sign up, sign in, who am I, sessions with revoke buttons, sign out.
// Built only on the public API of auth-client.js. Runs under a CSP without inline script or style, and
// writes every value with textContent: a user agent string is attacker-chosen text.
import { createAuthClient } from "../sdk/auth-client.js";

const auth = createAuthClient();
const $ = (id) => document.getElementById(id);

function show(signedIn) {
  $("signed-in").hidden = !signedIn;
  $("signed-out").hidden = signedIn;
}

function status(text) {
  $("status").textContent = text;
}

function error(err) {
  const box = $("error");
  if (err === null) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  let text = err?.message ?? String(err);
  if (err?.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
  box.textContent = text;
  box.hidden = false;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

async function render() {
  const response = await auth.fetch(new URL("auth/me", auth.issuer));
  if (!response.ok) return; // signed out meanwhile: the events below redraw the page
  const me = await response.json();
  $("me-email").textContent = me.email;
  $("me-role").textContent = me.role;
  $("me-id").textContent = me.id;
  $("me-version").textContent = String(me.tokenVersion);
  const sessions = await auth.sessions();
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const session of sessions) {
    const row = body.insertRow();
    row.dataset.sessionId = session.id;
    if (session.current) row.className = "current";
    cell(row, (session.current ? "This device: " : "") + (session.user_agent ?? "unknown device"), "device");
    cell(row, session.ip ?? "");
    cell(row, when(session.created_at));
    cell(row, when(session.last_used_at));
    const button = document.createElement("button");
    button.type = "button";
    button.className = "revoke";
    button.textContent = session.current ? "Sign out" : "Revoke";
    button.addEventListener("click", () => act(() => auth.revokeSession(session.id).then(() => auth.user && render())));
    row.insertCell().append(button);
  }
  status(`Signed in as ${me.email}.`);
}

async function act(task) {
  error(null);
  try {
    await task();
  } catch (err) {
    error(err);
  }
}

function credentials(form) {
  const data = new FormData(form);
  return [String(data.get("email") ?? ""), String(data.get("password") ?? "")];
}

auth.addEventListener("signedIn", () => {
  show(true);
  act(render);
});
auth.addEventListener("signedOut", () => {
  show(false);
  status("Signed out.");
});
auth.addEventListener("sessionExpired", () => {
  show(false);
  status("Your session has ended. Sign in again.");
});

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  act(() => auth.login(...credentials(event.currentTarget)));
});
$("sign-up").addEventListener("submit", (event) => {
  event.preventDefault();
  const [email, password] = credentials(event.currentTarget);
  act(async () => {
    await auth.register(email, password);
    await auth.login(email, password);
  });
});
$("reload").addEventListener("click", () => act(render));
$("sign-out").addEventListener("click", () => act(() => auth.logout()));
$("sign-out-everywhere").addEventListener("click", () => act(() => auth.logoutAll()));

act(async () => {
  const user = await auth.init();
  if (user === null) {
    show(false);
    status("Not signed in.");
  }
});
