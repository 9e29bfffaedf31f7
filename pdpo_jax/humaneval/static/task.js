// The task page's only script: buttons and keys 1/2/3 submit, Backspace (or Back) undoes the
// last answer; each sends JSON to the API and reloads /task, which the server renders.
"use strict";
(function () {
  const task = document.getElementById("task");
  if (!task) return;
  const status = document.getElementById("status");
  let busy = false;

  async function post(url, body, button) {
    if (busy) return;
    busy = true;
    task.classList.add("busy");
    if (button) button.classList.add("chosen");
    status.textContent = task.dataset.saving;
    try {
      const response = await fetch(url, {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      });
      if (!response.ok) {
        let detail = "HTTP " + response.status;
        try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
        throw new Error(detail);
      }
      window.location.replace("/task");
    } catch (error) {
      status.textContent = task.dataset.error + ": " + error.message;
      if (button) button.classList.remove("chosen");
      task.classList.remove("busy");
      busy = false;
    }
  }

  function choose(choice) {
    const id = Number(task.dataset.assignment);
    const button = document.getElementById("choose-" + choice);
    if (id && button) post("/api/judgments", {assignment_id: id, choice: choice}, button);
  }

  function back() {
    const id = Number(task.dataset.undo);
    if (id) post("/api/undo", {assignment_id: id}, null);
  }

  document.querySelectorAll("button[data-choice]").forEach(function (button) {
    button.addEventListener("click", function () { choose(Number(button.dataset.choice)); });
  });
  const backButton = document.getElementById("back");
  if (backButton) backButton.addEventListener("click", back);
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey || event.repeat) return;
    if (event.key === "1" || event.key === "2" || event.key === "3") {
      event.preventDefault();
      choose(Number(event.key));
    } else if (event.key === "Backspace") {
      event.preventDefault();
      back();
    }
  });
})();
