// openwham web UI: small progressive enhancements on server-rendered pages.
// Everything from the server or the agent is put into the page with textContent, never as
// HTML, except the task rows, which the server renders (escaped) itself.
"use strict";

(function () {
  const TERMINAL = ["completed", "failed", "cancelled"];
  const STATUS_LABELS = {
    pending: "Queued",
    in_progress: "Running",
    completed: "Completed",
    failed: "Failed",
    cancelled: "Cancelled",
  };

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function textOf(parts) {
    if (!Array.isArray(parts)) return "";
    return parts
      .map((p) => (typeof p === "string" ? p : p && typeof p.text === "string" ? p.text : ""))
      .join("");
  }

  // ------------------------------------------------------------------ forms

  function submitShortcuts() {
    document.querySelectorAll("form[data-submit-shortcut]").forEach((form) => {
      form.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
          event.preventDefault();
          const button = form.querySelector("[data-default]") || undefined;
          if (form.reportValidity()) form.requestSubmit(button);
        }
      });
    });
    document.querySelectorAll("form[data-confirm]").forEach((form) => {
      form.addEventListener("submit", (event) => {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
    document.querySelectorAll("a[data-back]").forEach((link) => {
      link.addEventListener("click", (event) => {
        if (window.history.length > 1) {
          event.preventDefault();
          window.history.back();
        }
      });
    });
    const envSelect = document.getElementById("environment_id");
    const branch = document.getElementById("branch");
    if (envSelect && branch) {
      const list = document.getElementById("branch-list");
      let asked = 0;
      // The repository's branches as suggestions; fetched after the page is up, so a slow
      // remote never holds the page (the field takes any name either way).
      const suggest = async (envId) => {
        if (!list || !envId) return;
        const ask = ++asked;
        list.textContent = "";
        try {
          const response = await fetch(`/environments/${encodeURIComponent(envId)}/branches`, {
            headers: { "X-Requested-With": "fetch" },
          });
          if (!response.ok || ask !== asked) return;
          const body = await response.json();
          if (ask !== asked) return;
          (body.branches || []).forEach((name) => {
            const option = document.createElement("option");
            option.value = name;
            list.appendChild(option);
          });
        } catch (err) {
          /* no suggestions: the field still takes any name */
        }
      };
      const update = () => {
        const option = envSelect.selectedOptions[0];
        branch.placeholder = (option && option.dataset.branch) || "default branch";
        suggest(envSelect.value);
      };
      envSelect.addEventListener("change", update);
      update();
    }
  }

  // ------------------------------------------------------------------ task list

  function taskList() {
    const live = document.getElementById("rows-live");
    if (!live) return;
    const table = live.closest("table");

    table.addEventListener("click", async (event) => {
      const link = event.target.closest("a.load-more");
      if (!link || !link.dataset.rows) return;
      event.preventDefault();
      link.textContent = "Loading…";
      const response = await fetch(link.dataset.rows, { headers: { "X-Requested-With": "fetch" } });
      if (!response.ok) {
        link.textContent = "Load more";
        return;
      }
      const body = document.createElement("tbody");
      body.className = "more-page";
      body.innerHTML = await response.text(); // server-rendered, escaped rows
      link.closest("tr").remove();
      table.appendChild(body);
    });

    if (!live.dataset.refresh) return;
    const refresh = async () => {
      if (document.hidden) return;
      try {
        const response = await fetch(live.dataset.refresh, {
          headers: { "X-Requested-With": "fetch" },
        });
        if (!response.ok) return;
        const html = await response.text();
        live.innerHTML = html; // server-rendered, escaped rows
        if (table.querySelector("tbody.more-page")) {
          const more = live.querySelector("tr.more-row");
          if (more) more.remove();
        }
      } catch (err) {
        /* offline for a moment: try again on the next tick */
      }
    };
    window.setInterval(refresh, 3000);
  }

  // ------------------------------------------------------------------ work log

  class WorkLog {
    constructor(root) {
      this.root = root;
      this.entries = new Map(); // message id -> {node, msg}
      this.calls = []; // call entries waiting for their result
      this.setup = null;
    }

    reset() {
      this.root.textContent = "";
      this.entries.clear();
      this.calls = [];
      this.setup = null;
    }

    setupLine(line) {
      if (!this.setup) {
        const box = el("details", "step setup");
        box.open = true;
        box.appendChild(el("summary", null, "Setup script"));
        this.setupPre = el("pre", "output");
        box.appendChild(this.setupPre);
        this.root.prepend(box);
        this.setup = box;
      }
      this.setupPre.textContent += line.endsWith("\n") ? line : line + "\n";
    }

    note(text) {
      this.root.appendChild(el("p", "step note", text));
    }

    network(e) {
      // a request through the egress proxy, as it is decided (the table lists them on reload)
      const verdict = e.decision === "allow" ? "Allowed" : "Refused";
      const where = String(e.domain || "") + (e.port ? ":" + e.port : "") + String(e.path || "");
      const why = e.decision === "allow" || !e.reason ? "" : " (" + e.reason + ")";
      const line = "Network: " + verdict + " " + String(e.method || "") + " " + where + why;
      this.root.appendChild(el("p", "step network proxy-" + (e.decision || "deny"), line));
    }

    message(msg) {
      if (!msg || !msg.id) return;
      const role = msg.author && msg.author.role;
      if (role === "user") return;
      if (role === "tool") return this.result(msg);
      const existing = this.entries.get(msg.id);
      const node = this.render(msg, existing);
      if (existing) {
        if (existing.node !== node) existing.node.replaceWith(node);
        existing.node = node;
        existing.msg = msg;
      } else {
        const entry = { node, msg, result: null };
        this.entries.set(msg.id, entry);
        this.root.appendChild(node);
        if (msg.content && msg.content.content_type === "code") this.calls.push(entry);
      }
    }

    result(msg) {
      let entry = this.entries.get(msg.id);
      if (!entry) {
        const name = msg.author && msg.author.name;
        const call = this.calls.find((c) => !c.result && c.msg.recipient === name);
        if (!call) return;
        entry = { node: call.node, msg, call };
        call.result = msg;
        this.entries.set(msg.id, entry);
      }
      entry.msg = msg;
      const call = entry.call;
      const out = call.node.querySelector("pre.output");
      const content = msg.content || {};
      out.textContent = textOf(content.parts) || content.text || "";
      out.hidden = false;
      const status = call.node.querySelector(".step-status");
      const code = msg.metadata && msg.metadata.exit_code;
      const failed = msg.status === "failed";
      call.node.classList.toggle("failed", failed);
      call.node.classList.remove("running");
      if (status) {
        status.textContent =
          typeof code === "number" ? `exit ${code}` : failed ? "failed" : "done";
      }
    }

    render(msg, existing) {
      const content = msg.content || {};
      const running = msg.status === "in_progress";
      if (content.content_type === "code") {
        let node = existing && existing.node;
        if (!node) {
          node = el("details", "step call");
          const summary = el("summary");
          summary.appendChild(el("code", "call-text"));
          summary.appendChild(el("span", "step-status"));
          node.appendChild(summary);
          const out = el("pre", "output");
          out.hidden = true;
          node.appendChild(out);
        }
        const summaryText = node.querySelector(".call-text");
        const status = node.querySelector(".step-status");
        let text = content.text || "";
        if (msg.recipient === "container.exec") {
          node.classList.add("cmd");
          try {
            const parsed = JSON.parse(text);
            if (parsed && typeof parsed.cmd === "string") text = parsed.cmd;
          } catch (err) {
            /* not JSON: show as is */
          }
          summaryText.textContent = "$ " + text;
        } else if (msg.recipient === "apply_patch") {
          node.classList.add("edit");
          const verbs = { A: "Added", D: "Deleted", M: "Edited" };
          summaryText.textContent = text
            .split("\n")
            .filter((line) => line.trim())
            .map((line) => {
              const flag = line.slice(0, 2);
              const verb = verbs[flag.trim()];
              return verb && flag[1] === " " ? `${verb} ${line.slice(2)}` : line;
            })
            .join(", ");
        } else {
          summaryText.textContent = (msg.recipient || "tool") + " " + text;
        }
        node.classList.toggle("running", running);
        if (running && status) status.textContent = "running…";
        return node;
      }
      const text = textOf(content.parts) || content.text || "";
      if (msg.metadata && msg.metadata.reasoning_status === "is_reasoning") {
        const node = el("details", "step think");
        node.appendChild(el("summary", null, running ? "Thinking…" : "Thought"));
        node.appendChild(el("div", "text", text));
        if (existing && existing.node.open) node.open = true;
        return node;
      }
      const node = el("div", "step say" + (msg.channel === "final" ? " final" : ""));
      node.appendChild(el("div", "text", text));
      return node;
    }
  }

  // ------------------------------------------------------------------ live status

  // Every badge of attempt `turn` (its tab and, when shown, the one above the log).
  function setBadges(status, turn) {
    document.querySelectorAll(".badge[data-turn]").forEach((node) => {
      if (node.dataset.turn !== turn) return;
      node.textContent = STATUS_LABELS[status] || status;
      node.className = "badge s-" + status;
    });
  }

  // The shown attempt ended: its answer, diff and follow-up box are the server's to render,
  // so reload now rather than show "Completed" above a box that still says wait.
  let reloading = false;
  function attemptEnded() {
    if (reloading) return;
    reloading = true;
    window.location.reload();
  }

  // The turn stream follows the shown attempt only; the other attempts' tabs (and the shown
  // one, should the stream drop) follow the server's statuses by polling.
  function attemptStatuses() {
    const article = document.querySelector("article.task[data-attempts]");
    if (!article) return;
    const badge = document.getElementById("attempt-badge");
    const shownActive = badge && !TERMINAL.includes(badge.dataset.status);
    const cacheLine = document.getElementById("setup-cache");
    let timer = 0;
    const poll = async () => {
      if (document.hidden) return;
      let body;
      try {
        const response = await fetch(article.dataset.attempts, {
          headers: { "X-Requested-With": "fetch" },
        });
        if (!response.ok) return;
        body = await response.json();
      } catch (err) {
        return; /* offline for a moment: try again on the next tick */
      }
      const attempts = body.attempts || [];
      attempts.forEach((a) => {
        if (badge && a.id === badge.dataset.turn) {
          // what the post-setup cache did, shown as soon as the attempt's setup is past it
          if (cacheLine && a.setup_cache && cacheLine.textContent !== a.setup_cache) {
            cacheLine.textContent = a.setup_cache;
            cacheLine.hidden = false;
          }
          if (TERMINAL.includes(a.status)) {
            if (shownActive) attemptEnded();
            return;
          }
        }
        setBadges(a.status, a.id);
      });
      if (attempts.every((a) => TERMINAL.includes(a.status))) window.clearInterval(timer);
    };
    timer = window.setInterval(poll, 2000);
    poll();
  }

  function workLog() {
    const root = document.getElementById("worklog");
    const dataNode = document.getElementById("worklog-data");
    if (!root || !dataNode) return;
    const log = new WorkLog(root);
    let data = {};
    try {
      data = JSON.parse(dataNode.textContent || "{}");
    } catch (err) {
      data = {};
    }
    (data.logs || []).forEach((line) => log.setupLine(line));
    // The answer of a finished attempt is shown below the log: not twice.
    (data.messages || [])
      .filter((msg) => !(data.hide_final && msg.channel === "final"))
      .forEach((msg) => log.message(msg));
    if (!root.children.length && !root.dataset.events) {
      root.appendChild(el("p", "hint", "Nothing was logged."));
    }
    const url = root.dataset.events;
    if (!url || !window.EventSource) return;
    const statusLine = document.getElementById("status-line");
    const badge = document.getElementById("attempt-badge");
    const source = new EventSource(url);
    let finished = false;
    source.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      const payload = frame.payload || {};
      switch (frame.item_type) {
        case "work_log_message":
          log.message(payload);
          break;
        case "log":
          if (payload.key) log.setupLine(String(payload.line || ""));
          else if (payload.text) {
            log.reset();
            log.note(String(payload.text));
          }
          break;
        case "proxy_event":
          log.network(payload);
          break;
        case "task_title_generated": {
          const title = document.getElementById("task-title");
          if (title && payload.title) {
            title.textContent = payload.title;
            document.title = payload.title + " · openwham";
          }
          break;
        }
        case "task_turn_event":
          if (TERMINAL.includes(payload.turn_status)) {
            if (!finished) {
              finished = true;
              source.close();
              attemptEnded();
            }
            break;
          }
          if (statusLine && payload.text) statusLine.textContent = payload.text;
          if (badge && payload.turn_status) setBadges(payload.turn_status, badge.dataset.turn);
          break;
      }
    };
  }

  // ------------------------------------------------------------------ diff

  function diffView() {
    // the task's diff, and a multi-repository attempt's other repositories' (each a section)
    document.querySelectorAll("section.diff").forEach(diffSection);
  }

  function diffSection(diff) {
    const buttons = diff.querySelectorAll("[data-diff-view]");
    const set = (view) => {
      diff.dataset.view = view;
      buttons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.diffView === view)));
      try {
        window.localStorage.setItem("wham.diffView", view);
      } catch (err) {
        /* private mode */
      }
    };
    buttons.forEach((b) => b.addEventListener("click", () => set(b.dataset.diffView)));
    let saved = null;
    try {
      saved = window.localStorage.getItem("wham.diffView");
    } catch (err) {
      saved = null;
    }
    if (saved === "split" || saved === "unified") set(saved);
    const toggle = diff.querySelector("[data-diff-toggle-all]");
    if (toggle) {
      toggle.addEventListener("click", () => {
        const files = diff.querySelectorAll("details.file");
        const anyOpen = Array.from(files).some((d) => d.open);
        files.forEach((d) => (d.open = !anyOpen));
        toggle.textContent = anyOpen ? "Expand all" : "Collapse all";
      });
    }
  }

  // ------------------------------------------------------------------ copy

  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach((button) => {
      button.addEventListener("click", async () => {
        const source = document.querySelector(button.dataset.copy);
        if (!source) return;
        const text = source.value;
        try {
          await navigator.clipboard.writeText(text);
        } catch (err) {
          source.focus();
          source.select();
          document.execCommand("copy");
        }
        const label = button.textContent;
        button.textContent = "Copied";
        window.setTimeout(() => (button.textContent = label), 1500);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    submitShortcuts();
    taskList();
    workLog();
    attemptStatuses();
    diffView();
    copyButtons();
  });
})();
