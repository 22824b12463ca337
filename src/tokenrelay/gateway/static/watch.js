// The watch page: submit a prompt (with an API key) or open a job link (/watch/JOB#token=T),
// then show the job's text token by token from its event stream, with its state and figures.
// The text is rebuilt from the stream by the rule of tokenrelay.stream.text (an `attempt`
// with the restart policy starts it over), so a reload or a second tab shows the same text.
"use strict";

const KEY_STORE = "tokenrelay.api-key";
const ENTRY_KINDS = ["start", "token", "attempt", "status", "gap", "end"];
const $ = (id) => document.getElementById(id);

const job = {
  id: null,
  token: null,
  source: null,
  lastId: null,
  tokens: 0,
  startMs: null,
  firstMs: null,
  ended: false,
};

function idMs(entryId) {
  return Number(String(entryId).split("-")[0]);
}

function newer(entryId) {
  if (!entryId || job.lastId === null) return true;
  const [ms, seq] = entryId.split("-").map(Number);
  const [lastMs, lastSeq] = job.lastId.split("-").map(Number);
  return ms > lastMs || (ms === lastMs && seq > lastSeq);
}

function setState(state) {
  $("state").textContent = state;
  $("state").dataset.state = state;
}

function showFigures() {
  $("count").textContent = String(job.tokens);
  if (job.firstMs !== null && job.startMs !== null) {
    $("ttft").textContent = `${Math.max(0, job.firstMs - job.startMs)} ms`;
  }
}

function showRate(lastMs) {
  const seconds = (lastMs - job.firstMs) / 1000;
  if (job.tokens > 1 && seconds > 0) {
    $("rate").textContent = ((job.tokens - 1) / seconds).toFixed(1);
  }
}

function finish(state) {
  job.ended = true;
  setState(state);
  $("cancel").hidden = true;
  if (job.source) job.source.close();
}

const handlers = {
  start(entry, entryId) {
    job.startMs = idMs(entryId);
    setState("started");
  },
  token(entry, entryId) {
    $("output").appendChild(document.createTextNode(Relay.printable(entry.text)));
    job.tokens += entry.n || 1;
    if (job.firstMs === null) job.firstMs = idMs(entryId);
    setState("streaming");
    showFigures();
    showRate(idMs(entryId));
  },
  attempt(entry) {
    if (entry.policy === "restart") {
      $("output").textContent = "";
      job.tokens = 0;
      job.firstMs = null;
      showFigures();
      Relay.say("notice", `attempt ${entry.attempt} starts over (${entry.reason})`);
    } else {
      Relay.say("notice", `attempt ${entry.attempt} goes on from token ${entry.from_seq} (${entry.reason})`);
    }
  },
  status(entry) {
    setState(entry.state);
    Relay.say("notice", `${entry.state}: ${entry.detail}`);
  },
  gap(entry) {
    const lost = Relay.el("span", `[tokens ${entry.first_seq} to ${entry.last_seq} were lost]`, "gap");
    $("output").appendChild(lost);
  },
  end(entry) {
    job.tokens = entry.tokens;
    showFigures();
    if (entry.ttft_ms !== null && entry.ttft_ms !== undefined) {
      $("ttft").textContent = `${Math.round(entry.ttft_ms)} ms`;
    }
    if (entry.duration_ms) {
      $("rate").textContent = (entry.tokens / (entry.duration_ms / 1000)).toFixed(1);
    }
    Relay.say("notice", "");
    finish("finished");
  },
};

function onEntry(kind, event) {
  // Already shown? (A resume never repeats, but be sure.) A gap carries the id of the entry
  // before it, so it is never newer than what was shown: it is always shown.
  if (kind !== "gap" && !newer(event.lastEventId)) return;
  const entry = JSON.parse(event.data);
  handlers[kind](entry, event.lastEventId);
  if (event.lastEventId) job.lastId = event.lastEventId;
}

function onErrorEntry(entry) {
  const cancelled = entry.error_type === "cancelled";
  Relay.say("problem", cancelled ? "The job was cancelled." : `The job failed: ${entry.error_type}: ${entry.message}`);
  finish(cancelled ? "cancelled" : "failed");
}

async function explainClosedStream() {
  // EventSource hides why a stream was refused; ask the status endpoint, which says.
  const result = await Relay.call(`/v1/jobs/${encodeURIComponent(job.id)}`, { headers: Relay.bearer(job.token) });
  if (!result.ok) refuse(result);
  else if (!job.ended) Relay.say("problem", "The event stream closed; reload to try again.");
}

function refuse(result) {
  setState("refused");
  Relay.say("problem", Relay.message(result, `refused (HTTP ${result.status})`));
  job.ended = true;
  if (job.source) job.source.close();
}

function openStream() {
  const url = `/v1/jobs/${encodeURIComponent(job.id)}/events?token=${encodeURIComponent(job.token)}`;
  const source = (job.source = new EventSource(url));
  for (const kind of ENTRY_KINDS) {
    source.addEventListener(kind, (event) => onEntry(kind, event));
  }
  source.addEventListener("error", (event) => {
    if (event.data !== undefined) {
      // An `error` entry of the job (the same event name as a connection error).
      if (newer(event.lastEventId)) onErrorEntry(JSON.parse(event.data));
      return;
    }
    if (job.ended) return;
    if (source.readyState === EventSource.CLOSED) explainClosedStream();
    else Relay.say("notice", "reconnecting…");
  });
  source.addEventListener("open", () => Relay.say("notice", ""));
  source.addEventListener("reconnect", (event) => {
    const why = JSON.parse(event.data).reason;
    Relay.say("notice", why === "shutdown" ? "the gateway is restarting; reconnecting…" : "catching up…");
  });
  source.addEventListener("trimmed", (event) => {
    // Entries were trimmed between what this page has and what comes next: mark the place.
    const lost = Relay.el("span", "[text lost here: the stream's length cap trimmed it before this page read it]", "gap");
    $("output").appendChild(lost);
    Relay.say("notice", JSON.parse(event.data).message);
  });
  source.addEventListener("failure", (event) => {
    const failure = JSON.parse(event.data);
    Relay.say("problem", `The stream cannot go on: ${failure.message}`);
    finish("unavailable");
  });
}

async function watch(jobId, token) {
  job.id = jobId;
  job.token = token;
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  if (!token) {
    refuse({ status: 401, body: { error: { message: "This link has no read token: ask for a link that has one." } } });
    return;
  }
  const share = $("share");
  share.href = `/watch/${encodeURIComponent(jobId)}#token=${encodeURIComponent(token)}`;
  share.hidden = false;
  $("cancel").hidden = !sessionStorage.getItem(KEY_STORE);
  const result = await Relay.call(`/v1/jobs/${encodeURIComponent(jobId)}`, { headers: Relay.bearer(token) });
  if (!result.ok) {
    refuse(result);
    return;
  }
  // The stream's own entries say the rest (an ended job's too, once it has replayed them).
  if (result.body.state === "queued") setState("queued");
  openStream();
}

async function submit(event) {
  event.preventDefault();
  Relay.say("form-error", "");
  const key = $("api-key").value.trim();
  const body = { prompt: $("prompt").value };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  if ($("model").value.trim()) body.model = $("model").value.trim();
  const result = await Relay.call("/v1/jobs", {
    method: "POST",
    headers: { ...Relay.bearer(key), "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!result.ok) {
    Relay.say("form-error", Relay.message(result, `refused (HTTP ${result.status})`));
    return;
  }
  sessionStorage.setItem(KEY_STORE, key); // this tab's submitter may cancel, after a reload too
  history.replaceState(null, "", result.body.watch_url);
  if (job.source) job.source.close();
  location.reload(); // the page of the new job, exactly as a viewer opening its link
}

async function cancel() {
  const key = sessionStorage.getItem(KEY_STORE);
  const result = await Relay.call(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, {
    method: "POST",
    headers: Relay.bearer(key),
  });
  if (!result.ok) Relay.say("problem", Relay.message(result, "the job could not be cancelled"));
  else if (!result.body.cancelled) Relay.say("notice", "the job had already ended");
}

document.addEventListener("DOMContentLoaded", () => {
  $("submit").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  const path = location.pathname.match(/^\/watch\/([A-Za-z0-9_-]{1,128})$/);
  if (path) {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    watch(path[1], token);
  }
});
