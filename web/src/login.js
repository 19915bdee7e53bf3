// The sign-in view, shown while the engine has users and the browser has no valid session.
// It posts to /auth/login, which sets an HttpOnly session cookie that the browser then sends
// with every request, the /ws feed included.
import { signIn } from "./api.js";
import { element } from "./format.js";

// `notice` explains why the view is shown (such as an expired session), or is empty.
// `onSignedIn` gets the session document of POST /auth/login.
export function mountLogin(root, notice, onSignedIn) {
  const username = element("input", {
    id: "login-username",
    name: "username",
    autocomplete: "username",
    required: true,
  });
  const password = element("input", {
    id: "login-password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
  });
  const submit = element("button", { type: "submit", text: "Sign in" });
  const message = element("p", { class: "message error", id: "login-message", role: "alert", text: notice });
  const form = element(
    "form",
    { class: "login", id: "login-form" },
    element("h1", { text: "Sign in" }),
    element("label", { for: "login-username", text: "User name" }),
    username,
    element("label", { for: "login-password", text: "Password" }),
    password,
    submit,
    message,
  );
  root.append(form);
  username.focus();

  let active = true;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    message.textContent = "";
    try {
      const session = await signIn(username.value, password.value);
      if (active) onSignedIn(session);
    } catch (failure) {
      message.textContent = failure.message;
      password.value = "";
      password.focus();
    } finally {
      submit.disabled = false;
    }
  });
  return () => {
    active = false;
  };
}
