// Progressive enhancement of the dashboard: every page works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Copy a created key to the clipboard.
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        button.textContent = "Copied";
      } catch {
        // No clipboard (an insecure origin, a refused permission): select it for Ctrl+C.
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = "Press Ctrl+C";
      }
    });
  }

  // Ask before a revocation; without this script the server asks on a page of its own.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        return;
      }
      form.elements.confirmed.value = "yes";
    });
  }

  // A key pasted to find it is looked for, and sent, as its visible prefix: its secret never
  // goes into an address.
  const visible = (value) => {
    const key = value.match(/([a-z][a-z0-9]{1,15}_[a-z]{1,8}_v1_[a-z2-7]{4})[a-z2-7]*/);
    return key ? key[1] : value;
  };
  // Filter the key table as one types; the form still filters on the server when submitted.
  for (const input of document.querySelectorAll("input[data-filter]")) {
    const table = document.getElementById(input.dataset.filter);
    if (!table) continue;
    input.form.addEventListener("submit", () => {
      input.value = visible(input.value.trim());
    });
    input.addEventListener("input", () => {
      const needle = visible(input.value.trim()).toLowerCase();
      for (const row of table.tBodies[0].rows) {
        row.hidden = needle !== "" && !(row.dataset.search || "").includes(needle);
      }
    });
  }
});
