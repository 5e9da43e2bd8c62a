// The hub's live view: lists topics with revision and data, live; edits a
// topic's JSON with compare-and-set. The token is typed into the page and
// kept in memory only: never in the URL, never stored.
import { ConflictError, HubError, connectHub, type Hub, type Replica, type Snapshot } from "../src/index.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

let hub: Hub | undefined;
const replicas = new Map<string, Replica<unknown>>();
let editing: { topic: string; revision: string } | undefined;

function hubUrl(): string {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/`;
}

function row(topic: string): HTMLTableRowElement {
  const body = $("topics");
  let tr = body.querySelector<HTMLTableRowElement>(`tr[data-topic="${CSS.escape(topic)}"]`);
  if (tr) return tr;
  tr = document.createElement("tr");
  tr.dataset.topic = topic;
  for (const name of ["name", "revision", "bytes", "subscribers", "data", "actions"]) {
    const td = document.createElement("td");
    td.className = name;
    if (["revision", "bytes", "subscribers"].includes(name)) td.classList.add("num");
    tr.appendChild(td);
  }
  (tr.querySelector(".name") as HTMLElement).textContent = topic;
  (tr.querySelector(".data") as HTMLElement).appendChild(document.createElement("pre"));
  const edit = document.createElement("button");
  edit.type = "button";
  edit.textContent = "Edit";
  edit.className = "edit";
  edit.onclick = () => openEditor(topic);
  (tr.querySelector(".actions") as HTMLElement).appendChild(edit);
  const rows = [...body.querySelectorAll<HTMLTableRowElement>("tr")];
  const after = rows.find((r) => (r.dataset.topic ?? "") > topic);
  body.insertBefore(tr, after ?? null);
  return tr;
}

function render(topic: string, snapshot: Snapshot<unknown>): void {
  const tr = row(topic);
  (tr.querySelector(".revision") as HTMLElement).textContent = snapshot.revision;
  const json = JSON.stringify(snapshot.data, null, 2);
  (tr.querySelector(".data pre") as HTMLElement).textContent = json;
  (tr.querySelector(".bytes") as HTMLElement).textContent = String(new TextEncoder().encode(JSON.stringify(snapshot.data)).length);
}

function follow(topic: string): void {
  if (!hub || replicas.has(topic)) return;
  const replica = hub.topic<unknown>(topic);
  replicas.set(topic, replica);
  replica.subscribe((snapshot) => render(topic, snapshot));
  replica.start().then(
    (snapshot) => render(topic, snapshot),
    () => replicas.delete(topic),
  );
}

async function poll(): Promise<void> {
  if (!hub || hub.status !== "live") return;
  try {
    const status = await hub.hubStatus();
    $("server").textContent = status.serverId;
    $("clients").textContent = String(status.stats.connections);
    $("subscriptions").textContent = String(status.stats.subscriptions);
    $("storage").textContent = status.stale ? "FAILING: reads may be stale" : status.sharedStorage ? "shared, ok" : "ok";
    for (const topic of status.topics) {
      follow(topic.topic);
      (row(topic.topic).querySelector(".subscribers") as HTMLElement).textContent = String(topic.subscribers);
    }
  } catch {
    // The status badge says why; the next poll tries again.
  }
}

function openEditor(topic: string): void {
  const current = replicas.get(topic)?.current;
  if (!current) return;
  editing = { topic, revision: current.revision };
  $("edit-topic").textContent = topic;
  $("edit-revision").textContent = current.revision;
  $<HTMLTextAreaElement>("edit-data").value = JSON.stringify(current.data, null, 2);
  say("edit-message", "", "");
  $("editor").hidden = false;
}

function say(id: string, text: string, kind: "ok" | "error" | ""): void {
  const element = $(id);
  element.textContent = text;
  element.className = `message ${kind}`;
}

$("editor").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!hub || !editing) return;
  let data: unknown;
  try {
    data = JSON.parse($<HTMLTextAreaElement>("edit-data").value);
  } catch (error) {
    say("edit-message", `Not JSON: ${(error as Error).message}`, "error");
    return;
  }
  const { topic, revision } = editing;
  try {
    const written = await hub.set(topic, data, { expectedRevision: revision });
    editing = { topic, revision: written };
    $("edit-revision").textContent = written;
    say("edit-message", `Saved at revision ${written}.`, "ok");
  } catch (error) {
    if (error instanceof ConflictError) {
      say(
        "edit-message",
        `Conflict: ${topic} changed to revision ${error.currentRevision} since you started; your edit was not saved. The table shows the newer data.`,
        "error",
      );
    } else if (error instanceof HubError && error.code === "forbidden") {
      say("edit-message", "This token may not write this topic.", "error");
    } else {
      say("edit-message", `Not saved: ${(error as Error).message}`, "error");
    }
  }
});

$("edit-cancel").addEventListener("click", () => {
  editing = undefined;
  $("editor").hidden = true;
});

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $<HTMLInputElement>("token").value;
  $<HTMLInputElement>("token").value = "";
  hub?.close();
  replicas.clear();
  $("topics").replaceChildren();
  hub = connectHub({ url: hubUrl(), clientId: "live-view", ...(token ? { token } : {}) });
  const badge = $("status");
  const show = (status: string, error?: Error) => {
    badge.textContent = status;
    badge.className = `badge ${status}`;
    if (status === "closed" && error) {
      say("login-message", `The hub refused the connection: ${error.message}`, "error");
      $("login").hidden = false;
    }
    if (status === "live") {
      say("login-message", "", "");
      $("login").hidden = true;
      $("view").hidden = false;
      void poll();
    }
  };
  show(hub.status);
  hub.onStatus((status, error) => show(status, error));
});

setInterval(() => void poll(), 1000);
