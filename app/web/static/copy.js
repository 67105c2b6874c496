/* Copy buttons: progressive enhancement. Without JavaScript the buttons stay hidden and
   the values can be selected and copied by hand. No inline script (CSP: script-src 'self'). */
(function () {
  "use strict";
  function announce(text) {
    var live = document.getElementById("live-region");
    if (live) {
      live.textContent = "";
      window.setTimeout(function () { live.textContent = text; }, 50);
    }
  }
  function selectText(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
  function copy(button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target) { return; }
    var text = target.textContent;
    var done = function () {
      button.classList.add("copied");
      announce("Copied to the clipboard");
      window.setTimeout(function () { button.classList.remove("copied"); }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {
        selectText(target);
        announce("Selected: press Control+C (or Command+C) to copy");
      });
    } else {
      selectText(target);
      try {
        if (document.execCommand("copy")) { done(); return; }
      } catch (ignored) { /* fall through */ }
      announce("Selected: press Control+C (or Command+C) to copy");
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var buttons = document.querySelectorAll("button[data-copy]");
    Array.prototype.forEach.call(buttons, function (button) {
      button.hidden = false;
      button.addEventListener("click", function () { copy(button); });
    });
  });
}());
