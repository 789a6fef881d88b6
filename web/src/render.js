// A model's answer as Markdown: marked parses it, DOMPurify removes anything that could run
// (script, event handlers, javascript: links), highlight.js colours code blocks. The page's
// Content-Security-Policy is the second wall: no inline script runs even if something got through.
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/common";
import { Marked } from "marked";

const marked = new Marked({ gfm: true, breaks: false });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const FORBID_TAGS = ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "svg", "math"];

export function renderMarkdown(element, text) {
  const html = marked.parse(text);
  // SANITIZE_NAMED_PROPS: an answer's id="input" must not take the page's own elements' ids
  element.innerHTML = DOMPurify.sanitize(html, {
    USE_PROFILES: { html: true },
    FORBID_TAGS,
    FORBID_ATTR: ["style"],
    SANITIZE_NAMED_PROPS: true,
  });
  for (const code of element.querySelectorAll("pre > code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (language && hljs.getLanguage(language)) {
      code.innerHTML = hljs.highlight(code.textContent, { language, ignoreIllegals: true }).value;
    } else {
      code.innerHTML = hljs.highlightAuto(code.textContent).value;
    }
    code.classList.add("hljs");
    const pre = code.parentElement;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code.textContent);
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
    pre.prepend(copy);
  }
}
