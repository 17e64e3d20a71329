// Threadline's web chat and dashboard: plain JavaScript over the JSON API and
// Server-Sent Events (/api/events). No build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c.nodeType ? c : String(c));
  return e;
};
const fmt = (ms) => { const s = Math.max(0, Math.floor(ms / 1000)); const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`; };
const when = (ms) => new Date(ms).toLocaleString();

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.headers["Idempotency-Key"] = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
  return data;
}

// Files picked in a form, as the API takes them: names and base64 contents.
async function readFiles(input) {
  return Promise.all([...input.files].map((file) => new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, content_base64: String(reader.result).split(",", 2)[1] || "" });
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  })));
}

// ---- the status card, shared by the chat and the run page ----------------------------

function renderCard(card, logs) {
  const elapsed = el("span", { class: "elapsed", "data-accepted": card.accepted_at, "data-finished": card.finished_at ?? "" }, card.elapsed);
  const meta = el("div", { class: "meta" },
    el("span", {}, `run ${card.run_id}`), el("span", {}, `agent ${card.agent}`),
    card.branch_url ? el("span", {}, "branch ", el("a", { href: card.branch_url, target: "_blank", class: "branch-link" }, card.branch))
                    : el("span", { class: "branch" }, `branch ${card.branch}`),
    card.commit ? el("span", { class: "mono" }, `commit ${card.commit}`) : null,
    card.exit_code !== null && card.exit_code !== undefined ? el("span", {}, `exit ${card.exit_code}`) : null,
    card.mode === "ask" ? el("span", { class: "ask" }, "read-only") : null,
    card.usage ? el("span", { class: "usage" }, card.usage) : null);
  const lines = logs && logs.length ? logs : card.log_lines;
  const buttons = el("div", { class: "buttons" }, card.buttons.map((b) => b.url
    ? el("a", { class: "button pr-link", href: b.url, target: "_blank" }, b.label)
    : el("button", { "data-action": b.action, onclick: (ev) => act(ev.target, b) }, b.label)));
  return el("div", { class: `card ${card.state}`, "data-run": card.run_id, "data-state": card.state },
    el("div", { class: "head" }, el("span", { class: "state" }, card.headline), elapsed),
    meta,
    card.diffstat ? el("div", { class: "diffstat" }, card.diffstat) : (card.terminal && !card.changed && card.mode !== "ask" ? el("div", { class: "diffstat" }, "no changes") : null),
    card.error ? el("div", { class: "err" }, card.error) : null,
    card.note ? el("div", { class: "note" }, card.note) : null,
    card.progress ? el("div", { class: "progress" }, card.progress) : null,
    card.blocked ? el("div", { class: "error" }, card.blocked) : null,
    card.summary ? el("div", { class: "summary" }, el("div", { class: "summary-label" }, "The agent's answer"), card.summary) : null,
    lines && lines.length ? el("pre", { class: "log" }, lines.join("\n")) : null,
    card.buttons.length ? buttons : null);
}

async function act(button, b) {
  button.disabled = true;
  try {
    if (b.action === "cancel") await api("POST", `/api/runs/${b.run_id}/cancel`, {});
    else if (b.action === "retry") await api("POST", `/api/runs/${b.run_id}/retry`, {});
    else if (b.action === "open_pr") await api("POST", `/api/runs/${b.run_id}/open-pr`, {});
    await refresh();
  } catch (e) {
    alert(e.message);
  } finally {
    button.disabled = false;
  }
}

// Live clocks on unfinished cards.
setInterval(() => {
  for (const e of document.querySelectorAll(".elapsed[data-accepted]")) {
    if (!e.dataset.finished) e.textContent = fmt(Date.now() - Number(e.dataset.accepted));
  }
}, 1000);

const liveLogs = new Map(); // run id -> last lines seen live
let refresh = async () => {};

function listen() {
  const source = new EventSource("/api/events");
  let pending = null;
  const soon = () => { clearTimeout(pending); pending = setTimeout(() => refresh(), 100); };
  source.addEventListener("card", soon);
  source.addEventListener("resync", soon);
  source.addEventListener("log", (ev) => {
    const { run_id, line } = JSON.parse(ev.data);
    const lines = liveLogs.get(run_id) || [];
    lines.push(line);
    liveLogs.set(run_id, lines.slice(-8));
    const pre = $(`.card[data-run="${CSS.escape(run_id)}"] pre.log`);
    if (pre) pre.textContent = liveLogs.get(run_id).join("\n"); else soon();
  });
  // Runs executed by other processes (the CLI) do not reach this stream: poll slowly too.
  setInterval(() => refresh(), 5000);
}

// ---- the chat ----------------------------------------------------------------------

async function chat() {
  let current = null;
  const { repos, agents, default_agent } = await api("GET", "/api/repos");
  const repoSel = $("#repo"), agentSel = $("#agent");
  if (!repos.length) {
    $("#start-error").textContent = "No repositories are configured: start with `threadline serve --repo PATH` or add [repos.NAME] to the config.";
  }
  for (const r of repos) repoSel.append(el("option", { value: r.name }, `${r.name} (${r.base_branch})`));
  const pickAgent = () => {
    const r = repos.find((x) => x.name === repoSel.value);
    agentSel.value = r ? r.agent : default_agent;
  };
  for (const a of agents) agentSel.append(el("option", { value: a }, a));
  repoSel.addEventListener("change", pickAgent);
  pickAgent();

  const show = (id) => {
    current = id;
    history.replaceState(null, "", id ? `/#${id}` : "/");
    $("#start").hidden = !!id;
    $("#thread").hidden = !id;
    refresh();
  };
  $("#new-thread").addEventListener("click", () => show(null));

  $("#start").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = $("#start button[type=submit]");
    button.disabled = true;
    $("#start-error").textContent = "";
    try {
      const attachments = await readFiles($("#start-files"));
      const res = await api("POST", "/api/pipelines", { repo: repoSel.value, agent: agentSel.value, prompt: $("#start-prompt").value, attachments });
      $("#start-prompt").value = "";
      $("#start-files").value = "";
      show(res.pipeline.id);
    } catch (e) {
      $("#start-error").textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  $("#reply").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = $("#reply button[type=submit]");
    button.disabled = true;
    $("#reply-error").textContent = "";
    try {
      const attachments = await readFiles($("#reply-files"));
      await api("POST", `/api/pipelines/${current}/runs`, { prompt: $("#reply-prompt").value, attachments });
      $("#reply-prompt").value = "";
      $("#reply-files").value = "";
      await refresh();
    } catch (e) {
      $("#reply-error").textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });

  refresh = async () => {
    const { pipelines } = await api("GET", "/api/pipelines?surface=web");
    const list = $("#threads");
    list.replaceChildren(...pipelines.map((p) => el("li", {
      class: p.pipeline.id === current ? "active" : "", "data-pipeline": p.pipeline.id, onclick: () => show(p.pipeline.id) },
      el("span", { class: `dot ${p.latest ? p.latest.state : ""}` }), el("span", { class: "title" }, p.pipeline.title))));
    if (!current) return;
    const { pipeline, runs } = await api("GET", `/api/pipelines/${current}`);
    $("#thread-head").replaceChildren(el("h2", {}, pipeline.title),
      el("div", { class: "meta" }, `${pipeline.repo} · branch ${pipeline.branch} from ${pipeline.base_branch} · agent ${pipeline.agent}`));
    $("#messages").replaceChildren(...runs.map(({ run, card }) => el("li", { class: "message" },
      el("div", { class: "prompt" }, el("span", { class: "who" }, `${run.requested_by} · ${when(run.created_at)}`), run.prompt),
      renderCard(card, liveLogs.get(card.run_id)))));
  };
  listen();
  show(location.hash.slice(1) || null);
}

// ---- the dashboard -------------------------------------------------------------------

async function dashboard() {
  const path = location.pathname;
  const view = $("#view");
  if (path.startsWith("/runs/")) {
    const id = decodeURIComponent(path.slice(6));
    refresh = async () => {
      const { pipeline, run, card, events, log_tail } = await api("GET", `/api/runs/${id}`);
      view.replaceChildren(
        el("h1", {}, `Run ${run.id}`),
        el("p", {}, el("a", { href: `/pipelines/${pipeline.id}` }, `pipeline ${pipeline.id}`), ` · ${pipeline.repo} · ${pipeline.branch}`),
        el("p", { class: "prompt-text" }, run.prompt),
        renderCard(card),
        el("h2", {}, "State history"),
        el("table", {}, el("tr", {}, el("th", {}, "state"), el("th", {}, "at"), el("th", {}, "detail")),
          events.map((e) => el("tr", {}, el("td", {}, e.state), el("td", {}, when(e.at)), el("td", {}, e.detail)))),
        el("h2", {}, "Log (last lines, redacted)"),
        el("pre", { class: "log full" }, (liveLogs.get(run.id) && !card.terminal ? liveLogs.get(run.id).join("\n") : log_tail) || "(no output yet)"));
    };
  } else if (path.startsWith("/pipelines/")) {
    const id = decodeURIComponent(path.slice(11));
    refresh = async () => {
      const { pipeline, runs, pull_request, approvals } = await api("GET", `/api/pipelines/${id}`);
      view.replaceChildren(
        el("h1", {}, pipeline.title),
        el("p", {}, `${pipeline.repo} · branch ${pipeline.branch} from ${pipeline.base_branch} · from ${pipeline.surface}`),
        pull_request ? el("p", { id: "pull-request" }, pull_request.found ? "pull request (found, opened by hand) " : "pull request ",
          el("a", { href: pull_request.url, target: "_blank" }, `#${pull_request.number}`), ` · by ${pull_request.opened_by}`) : null,
        runsTable(runs),
        approvals.length ? el("h2", {}, "Open PR decisions") : null,
        approvals.length ? el("table", { id: "approvals" },
          el("tr", {}, ["when", "who", "run", "decision", "detail"].map((h) => el("th", {}, h))),
          approvals.map((a) => el("tr", {},
            el("td", {}, when(a.at)), el("td", {}, a.actor), el("td", { class: "mono" }, a.run_id),
            el("td", { class: a.approved ? "approved" : "refused" }, a.approved ? "approved" : "refused"),
            el("td", {}, a.reason)))) : null);
    };
  } else {
    refresh = async () => {
      const [{ pipelines }, { days }] = await Promise.all([api("GET", "/api/pipelines"), api("GET", "/api/stats?days=14")]);
      if (!pipelines.length) { view.replaceChildren(el("p", { class: "empty" }, "No pipelines yet.")); return; }
      view.replaceChildren(el("h1", {}, "Pipelines"), statsChart(days), el("table", { id: "pipelines" },
        el("tr", {}, ["pipeline", "repo", "branch", "from", "runs", "latest", "prompted by", "created"].map((h) => el("th", {}, h))),
        pipelines.map((p) => el("tr", { "data-pipeline": p.pipeline.id },
          el("td", { class: "mono" }, el("a", { href: `/pipelines/${p.pipeline.id}` }, p.pipeline.id)),
          el("td", {}, p.pipeline.repo),
          el("td", { class: "mono" }, p.latest && p.latest.branch_url ? el("a", { href: p.latest.branch_url }, p.pipeline.branch) : p.pipeline.branch),
          el("td", { class: "from" }, p.pipeline.surface === "web" ? el("a", { href: `/#${p.pipeline.id}` }, "web chat")
            : p.pipeline.thread_url ? el("a", { href: p.pipeline.thread_url, target: "_blank" }, `${p.pipeline.surface} thread`)
            : p.pipeline.surface),
          el("td", {}, p.runs),
          el("td", {}, p.latest ? el("a", { href: `/runs/${p.latest.run_id}` }, el("span", { class: `dot ${p.latest.state}` }), " ", p.latest.headline) : "-"),
          el("td", {}, p.requested_by || "-"),
          el("td", {}, when(p.pipeline.created_at))))));
    };
  }
  listen();
  await refresh();
}

// Runs per day by outcome (stacked bars) and their cost (a line), as inline SVG.
const OUTCOMES = [["succeeded", "#1f8a4c"], ["failed", "#c0362c"], ["timed_out", "#8a4b1f"], ["cancelled", "#b7791f"]];
function statsChart(days) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, ...kids) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    for (const k of kids) n.append(k);
    return n;
  };
  const W = 560, H = 140, pad = 24, bw = (W - 2 * pad) / days.length;
  const total = (d) => OUTCOMES.reduce((n, [k]) => n + d[k], 0);
  const maxRuns = Math.max(1, ...days.map(total));
  const maxCost = Math.max(0.01, ...days.map((d) => d.cost_usd));
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H + 20}`, class: "stats", role: "img", "aria-label": "runs per day and cost" });
  days.forEach((d, i) => {
    let y = H;
    for (const [k, color] of OUTCOMES) {
      const h = (d[k] / maxRuns) * (H - pad);
      if (h > 0) {
        y -= h;
        chart.append(svg("rect", { x: pad + i * bw + 2, y, width: bw - 4, height: h, fill: color },
          svg("title", {}, `${d.day}: ${d[k]} ${k.replace("_", " ")}`)));
      }
    }
    if (i % 2 === 0) chart.append(svg("text", { x: pad + i * bw + bw / 2, y: H + 14, "text-anchor": "middle", "font-size": 9 }, d.day.slice(5)));
  });
  const points = days.map((d, i) => `${pad + i * bw + bw / 2},${H - (d.cost_usd / maxCost) * (H - pad)}`).join(" ");
  chart.append(svg("polyline", { points, fill: "none", stroke: "#3057d5", "stroke-width": 2 }, svg("title", {}, "cost (USD)")));
  const runs = days.reduce((n, d) => n + total(d), 0), cost = days.reduce((c, d) => c + d.cost_usd, 0);
  return el("figure", { id: "stats" }, chart,
    el("figcaption", {}, `Last ${days.length} days: ${runs} runs ended, $${cost.toFixed(2)} reported by agents. Bars: `,
      ...OUTCOMES.map(([k, c]) => el("span", { style: `color:${c}` }, ` ${k.replace("_", " ")} `)), "; line: cost (max $" + maxCost.toFixed(2) + ")."));
}

function runsTable(runs) {
  return el("table", {},
    el("tr", {}, ["run", "state", "queue", "exit", "duration", "commit", "changes", "prompted by", "prompt"].map((h) => el("th", {}, h))),
    runs.map(({ run, card }) => el("tr", {},
      el("td", { class: "mono" }, el("a", { href: `/runs/${run.id}` }, run.id)),
      el("td", {}, el("span", { class: `dot ${run.state}` }), " ", card.headline),
      el("td", {}, run.state === "queued" ? card.headline.replace(/^queued ?/, "") || "next" : "-"),
      el("td", {}, run.exit_code ?? "-"),
      el("td", {}, card.elapsed),
      el("td", { class: "mono" }, card.commit || "-"),
      el("td", {}, card.diffstat || (card.terminal ? "none" : "-")),
      el("td", {}, run.requested_by),
      el("td", {}, run.prompt.split("\n")[0].slice(0, 80)))));
}

(document.body.dataset.page === "chat" ? chat : dashboard)().catch((e) => {
  document.body.append(el("p", { class: "error" }, `Threadline: ${e.message}`));
});
