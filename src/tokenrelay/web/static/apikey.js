// The API key a page sends: kept in this origin's localStorage, asked for in a dialog.
//
// The secret lives in storage, in memory and in the requests' headers only: never in a URL,
// the page's text or the console. The dialog's field is emptied as soon as it is read.

/** A page's key; fires "change" when one is entered or forgotten. */
export class ApiKey extends EventTarget {
  #item;
  #refusals;
  #texts;
  #secret;
  #asking = null; // the open dialog's promise, shared by every request waiting on it
  #ui = null;

  /**
   * `item` names the localStorage entry; `refusals` are the statuses that mean "not this key"
   * (401, and 403 on a page only the admin key may use); `texts` holds the dialog's `title`,
   * `label` and `intro`.
   */
  constructor(item, { refusals = [401], ...texts }) {
    super();
    this.#item = item;
    this.#refusals = refusals;
    this.#texts = texts;
    this.#secret = readStorage(item);
  }

  /** The key to send, or null. */
  get secret() {
    return this.#secret;
  }

  refuses(status) {
    return this.#refusals.includes(status);
  }

  /**
   * The server refused `rejected` (null: no key was sent) with `message`: ask for another.
   * Resolves true once there is a new key to try, false when the person closes the dialog.
   */
  replace(rejected, message) {
    // Requests sent before a new key was entered come back refused: they just try again.
    if (this.#secret !== rejected) return Promise.resolve(true);
    this.#asking ??= this.#ask(rejected === null ? null : message).finally(() => {
      this.#asking = null;
    });
    return this.#asking;
  }

  forget() {
    this.#secret = null;
    try {
      localStorage.removeItem(this.#item);
    } catch {
      // Storage is off: the key was only ever in memory.
    }
    this.dispatchEvent(new Event("change"));
  }

  #store(secret) {
    this.#secret = secret;
    try {
      localStorage.setItem(this.#item, secret);
    } catch {
      // Storage is off (a private window's policy, say): keep the key for this page only.
    }
    this.dispatchEvent(new Event("change"));
  }

  #ask(error) {
    const ui = (this.#ui ??= buildDialog(this.#texts));
    ui.error.textContent = error ?? "";
    ui.error.hidden = error === null;
    ui.input.value = "";
    return new Promise((resolve) => {
      const submit = (event) => {
        event.preventDefault();
        const secret = ui.input.value.trim();
        ui.input.value = "";
        if (secret === "") return;
        this.#store(secret);
        ui.dialog.close("entered");
      };
      ui.form.addEventListener("submit", submit);
      ui.dialog.addEventListener(
        "close",
        () => {
          ui.form.removeEventListener("submit", submit);
          resolve(ui.dialog.returnValue === "entered");
        },
        { once: true },
      );
      ui.dialog.returnValue = "";
      ui.dialog.showModal();
      ui.input.focus();
    });
  }
}

function readStorage(item) {
  try {
    return localStorage.getItem(item) || null;
  } catch {
    return null;
  }
}

/** The dialog, made once per page: a password field, the server's refusal, two buttons. */
function buildDialog({ title, label, intro }) {
  const element = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text) node.textContent = text;
    return node;
  };
  const dialog = element("dialog", "key-dialog");
  dialog.setAttribute("aria-labelledby", "key-title");
  const form = element("form", "key-form");
  form.noValidate = true;
  const heading = element("h2", "key-title", title);
  heading.id = "key-title";
  const field = element("label", "key-field");
  const input = element("input", "key-input");
  Object.assign(input, { type: "password", id: "key-input", autocomplete: "off", spellcheck: false });
  input.setAttribute("autocapitalize", "off");
  field.htmlFor = input.id;
  field.textContent = label;
  const error = element("p", "key-error");
  error.setAttribute("role", "alert");
  const actions = element("div", "key-actions");
  const cancel = element("button", "key-cancel", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => dialog.close(""));
  const submit = element("button", "key-submit", "Continue");
  submit.type = "submit";
  actions.append(cancel, submit);
  form.append(heading, element("p", "key-intro", intro), field, input, error, actions);
  dialog.append(form);
  document.body.append(dialog);
  return { dialog, form, input, error };
}
