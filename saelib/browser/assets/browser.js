/* saelib feature browser: renders the data files that saelib/browser.py writes. No dependencies;
   works from file:// (data come as <script> files, not fetch). Token text is only ever set with
   textContent, never parsed as HTML, so no token can inject markup. */
var SAEB = (function () {
  "use strict";
  var store = {};
  var SVG = "http://www.w3.org/2000/svg";

  function put(key, value) { store[key] = value; }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svgEl(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(x) { return Number(x.toPrecision(3)).toString(); }

  function text(id) {
    var t = store.tokens.vocab[id];
    return t === undefined ? "[" + id + "]" : t;
  }

  function shade(a, vmax) {
    return "rgba(255,110,0," + Math.min(1, Math.max(0, a / vmax)).toFixed(2) + ")";
  }

  /* ex = [window, position, value, [offset, activation, ...]]: the nonzero activations around the token. */
  function context(ex, vmax) {
    var meta = store.index, w = ex[0], p = ex[1], acts = {0: ex[2]};
    for (var i = 0; i < ex[3].length; i += 2) acts[ex[3][i]] = ex[3][i + 1];
    var ids = store.tokens.windows[w], skip = store.tokens.unscanned[w] || [];
    var line = el("div", {"class": "ctx"});
    for (var q = Math.max(0, p - meta.before); q <= Math.min(ids.length - 1, p + meta.after); q++) {
      var off = q - p, u = skip.indexOf(q) >= 0, a = u ? 0 : (acts[off] || 0);
      if (u && q === 0) continue;  // an unscanned BOS is not text
      var s = el("span", {"class": "tok" + (off === 0 ? " max" : "") + (u ? " u" : ""),
                          title: (u ? "not scanned" : "activation " + fmt(a)) + " \u00b7 token id " + ids[q]},
                 text(ids[q]));
      if (a > 0) s.style.background = shade(a, vmax);
      line.appendChild(s);
    }
    return line;
  }

  function examples(parent, list, vmax) {
    list.forEach(function (ex) {
      var d = el("div", {"class": "ex"});
      d.appendChild(el("span", {"class": "val"}, fmt(ex[2])));
      d.appendChild(context(ex, vmax));
      parent.appendChild(d);
    });
  }

  function histogram(counts, vmax) {
    var W = 340, H = 110, most = Math.max.apply(null, counts.concat([0]));
    var top = most > 0 ? Math.log1p(most) : 1, bar = (W - 10) / Math.max(1, counts.length);
    var svg = svgEl("svg", {"class": "hist", width: W, height: H, viewBox: "0 0 " + W + " " + H});
    counts.forEach(function (c, i) {
      if (!c) return;
      var h = (H - 34) * Math.log1p(c) / top;
      var r = svgEl("rect", {x: (5 + i * bar).toFixed(1), y: (H - 20 - h).toFixed(1),
                             width: (bar - 1).toFixed(1), height: h.toFixed(1)});
      r.appendChild(svgEl("title", {}, c + " tokens"));
      svg.appendChild(r);
    });
    svg.appendChild(svgEl("text", {x: 5, y: H - 5}, "0"));
    svg.appendChild(svgEl("text", {x: W - 5, y: H - 5, "text-anchor": "end"}, fmt(vmax)));
    svg.appendChild(svgEl("text", {x: 5, y: 10}, "tokens per activation bin (log scale)"));
    return svg;
  }

  /* A token in a table cell, on a grey chip so that whitespace tokens show. */
  function tokenCell(id) {
    var td = el("td", {"class": "tt"});
    if (id >= 0) td.appendChild(el("span", {}, text(id)));
    return td;
  }

  function logitTable(title, list) {
    var t = el("table", {"class": "logits"}), head = el("tr");
    head.appendChild(el("th", {colspan: 2}, title));
    t.appendChild(head);
    list.forEach(function (pair) {
      var tr = el("tr");
      tr.appendChild(tokenCell(pair[0]));
      tr.appendChild(el("td", {}, (pair[1] >= 0 ? "+" : "") + pair[1].toFixed(3)));
      t.appendChild(tr);
    });
    return t;
  }

  function renderFeature(root, f, rec) {
    var m = store.index, d = m.density[f], vmax = m.max[f];
    root.textContent = "";
    document.title = m.name + " \u00b7 feature " + f;
    var nav = el("div", {"class": "nav"});
    nav.appendChild(el("a", {href: "index.html"}, "\u2190 all features"));
    if (f > 0) nav.appendChild(el("a", {href: "#" + (f - 1)}, "\u2039 " + (f - 1)));
    if (f + 1 < m.n_features) nav.appendChild(el("a", {href: "#" + (f + 1)}, (f + 1) + " \u203a"));
    var jump = el("input", {type: "number", min: 0, max: m.n_features - 1, placeholder: "feature"});
    jump.addEventListener("change", function () { location.hash = "#" + jump.value; });
    nav.appendChild(jump);
    root.appendChild(nav);
    var head = el("div", {"class": "head"});
    head.appendChild(el("b", {}, m.name + " \u00b7 feature " + f));
    head.appendChild(document.createTextNode(" density " + fmt(100 * d) + "% (" + m.count[f] + " of " +
      m.n_tokens.toLocaleString("en") + " tokens) \u00b7 max " + fmt(vmax)));
    root.appendChild(head);
    var row = el("div", {"class": "row"});
    row.appendChild(histogram(rec.h, vmax));
    if (rec.p.length) {
      row.appendChild(logitTable("promoted", rec.p));
      row.appendChild(logitTable("suppressed", rec.s));
    } else {
      row.appendChild(el("span", {"class": "note"}, m.logit_note));
    }
    root.appendChild(row);
    if (!rec.t.length) {
      root.appendChild(el("p", {}, "This feature did not fire on the " + m.n_tokens.toLocaleString("en") +
                                   " scanned tokens."));
      return;
    }
    root.appendChild(el("h4", {}, "top activations"));
    examples(root, rec.t, vmax);
    rec.q.forEach(function (bin) {
      root.appendChild(el("h4", {}, "quantile " + bin[0] + ": activations " + fmt(bin[1]) + " to " + fmt(bin[2])));
      examples(root, bin[3], vmax);
    });
  }

  function featurePage() {
    var m = store.index, root = document.getElementById("feature");
    function show() {
      var f = parseInt(location.hash.slice(1), 10);
      if (!(f >= 0 && f < m.n_features)) f = 0;
      var key = "f" + Math.floor(f / m.chunk);
      if (store[key]) return renderFeature(root, f, store[key][f % m.chunk]);
      var s = document.createElement("script");
      s.src = "data/" + key + ".js";
      s.onload = function () { renderFeature(root, f, store[key][f % m.chunk]); };
      s.onerror = function () { root.textContent = "could not load " + s.src; };
      document.head.appendChild(s);
    }
    window.addEventListener("hashchange", show);
    show();
  }

  function indexPage() {
    var m = store.index, tbody = document.querySelector("#features tbody");
    var search = document.getElementById("search"), shown = document.getElementById("shown");
    var keys = {index: function (i) { return i; }, density: function (i) { return m.density[i]; },
                max: function (i) { return m.max[i]; }};
    var state = {key: "density", dir: -1};
    var all = m.density.map(function (_, i) { return i; });
    function cell(tr, value, cls) { tr.appendChild(el("td", cls ? {"class": cls} : {}, value)); }
    function render() {
      var q = search.value.trim().toLowerCase(), key = keys[state.key];
      var rows = all.filter(function (i) {
        return !q || String(i) === q || (m.top[i] >= 0 && text(m.top[i]).toLowerCase().indexOf(q) >= 0) ||
               (m.promoted[i] >= 0 && text(m.promoted[i]).toLowerCase().indexOf(q) >= 0);
      });
      rows.sort(function (a, b) { return state.dir * (key(a) - key(b)) || a - b; });
      tbody.textContent = "";
      rows.forEach(function (i) {
        var tr = el("tr"), td = el("td", {"class": "num"});
        td.appendChild(el("a", {href: "feature.html#" + i}, String(i)));
        tr.appendChild(td);
        cell(tr, fmt(100 * m.density[i]) + "%", "num");
        cell(tr, fmt(m.max[i]), "num");
        tr.appendChild(tokenCell(m.top[i]));
        tr.appendChild(tokenCell(m.promoted[i]));
        tbody.appendChild(tr);
      });
      shown.textContent = rows.length + " of " + m.n_features + " features";
      document.querySelectorAll("#features th").forEach(function (th) {
        th.className = th.dataset.key === state.key ? "sorted" + (state.dir > 0 ? " asc" : "") : "";
      });
    }
    document.querySelectorAll("#features th").forEach(function (th) {
      if (!th.dataset.key) return;
      th.addEventListener("click", function () {
        state = {key: th.dataset.key, dir: th.dataset.key === state.key ? -state.dir :
                 (th.dataset.key === "index" ? 1 : -1)};
        render();
      });
    });
    search.addEventListener("input", render);
    render();
  }

  return {put: put, indexPage: indexPage, featurePage: featurePage};
})();
