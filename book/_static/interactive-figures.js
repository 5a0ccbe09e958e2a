/* Interactive figures of the MLA book: plain JavaScript and SVG, no libraries, no network.
 *
 * scripts/interactive_figures.py (a Sphinx extension) puts <div class="interactive-figure"
 * data-figure="KIND"> on the page and writes window.MLA_BOOK_DATA (presets, hardware and dtype
 * sizes) from the mla_tutorial package. Each formula below mirrors the package function it is
 * named after; tests/test_interactive_figures.py moves the controls in a browser and checks
 * the numbers shown against those functions.
 *
 * Every control carries data-control="NAME" and every result data-output="NAME" with the
 * unrounded number in data-value, so a test (or a curious reader) can read them.
 */
(function () {
  "use strict";
  var DATA = window.MLA_BOOK_DATA;

  // --- formulas: each mirrors the mla_tutorial function of the same name ----------------------

  // accounting.kv_cache_elements: values cached per token per layer.
  function kvCacheElements(c, mode) {
    if (c.kind === "standard") return 2 * c.n_kv * c.d_h;
    if (mode === "expanded") return c.n_h * (c.d_h + c.d_h_R + c.d_v);
    return c.d_c + c.d_h_R; // latent / absorbed: [c_KV, k_R]
  }

  // roofline.attention_flops_per_cached_token: FLOPs per query token per cached token per layer.
  function attentionFlopsPerCachedToken(c, mode) {
    if (c.kind === "standard") return 4 * c.n_h * c.d_h;
    var expanded = 2 * c.n_h * (c.d_h + c.d_h_R) + 2 * c.n_h * c.d_v;
    if (mode === "expanded") return expanded;
    if (mode === "latent") return expanded + 2 * c.d_c * c.n_h * (c.d_h + c.d_v);
    return 2 * c.n_h * (c.d_c + c.d_h_R) + 2 * c.n_h * c.d_c; // absorbed
  }

  // roofline.DecodeModel.from_config and its properties.
  function decodeModel(c, mode, w) {
    var m = {
      total_params: w.total_params, active_params: w.active_params, num_layers: c.layers,
      cache_elements_per_token_per_layer: kvCacheElements(c, mode),
      attention_flops_per_cached_token_per_layer: attentionFlopsPerCachedToken(c, mode),
      weight_bytes_per_param: w.weight_bytes_per_param, cache_bytes_per_element: w.cache_bytes_per_element
    };
    m.weight_bytes = m.total_params * m.weight_bytes_per_param;
    m.cache_bytes_per_token = m.cache_elements_per_token_per_layer * m.num_layers * m.cache_bytes_per_element;
    m.weightBytesRead = function (batch) {
      return Math.min(m.total_params, batch * m.active_params) * m.weight_bytes_per_param;
    };
    m.flopsPerToken = function (context) {
      return 2 * m.active_params + context * m.num_layers * m.attention_flops_per_cached_token_per_layer;
    };
    return m;
  }

  // roofline.Node
  function node(acc, count, fraction) {
    return {
      usable_memory_bytes: count * acc.memory_bytes * fraction,
      bandwidth_bytes_per_s: count * acc.bandwidth_bytes_per_s,
      peak_flops_per_s: count * acc.peak_flops_per_s
    };
  }

  // roofline.max_batch: the largest batch whose cache fits beside the weights.
  function maxBatch(m, n, context) {
    var room = n.usable_memory_bytes - m.weight_bytes;
    if (room <= 0) return 0;
    return Math.floor(room / (context * m.cache_bytes_per_token));
  }

  // roofline.decode_step: the roofline estimate of one decode step.
  function decodeStep(m, n, batch, context) {
    var weights = batch ? m.weightBytesRead(batch) : 0;
    var cache = batch * context * m.cache_bytes_per_token;
    var flops = batch * m.flopsPerToken(context);
    var memory = (weights + cache) / n.bandwidth_bytes_per_s, compute = flops / n.peak_flops_per_s;
    var step = Math.max(memory, compute);
    return {weight_bytes: weights, cache_bytes: cache, flops: flops, memory_time_s: memory,
            compute_time_s: compute, step_time_s: step, bound: memory >= compute ? "memory" : "compute",
            tokens_per_s: batch ? batch / step : 0};
  }

  // config.yarn_get_mscale
  function yarnGetMscale(scale, mscale) {
    if (mscale === undefined) mscale = 1;
    return scale <= 1 ? 1 : 0.1 * mscale * Math.log(scale) + 1;
  }

  // rope.yarn_inv_freq (and rope.rope_inv_freq for `base`).
  function yarnInvFreq(dim, theta, s) {
    var factor = s.factor, original = s.original_max_position_embeddings;
    var betaFast = s.beta_fast || 32, betaSlow = s.beta_slow || 1;
    function correctionDim(rotations) {
      return dim * Math.log(original / (rotations * 2 * Math.PI)) / (2 * Math.log(theta));
    }
    var low = correctionDim(betaFast), high = correctionDim(betaSlow);
    if (s.truncate === undefined || s.truncate === null || s.truncate) {
      low = Math.floor(low); high = Math.ceil(high);
    }
    low = Math.max(low, 0); high = Math.min(high, dim - 1);
    if (low === high) high += 0.001;
    var base = [], inv = [], keep = [];
    for (var i = 0; i < dim / 2; i++) {
      var b = 1 / Math.pow(theta, (2 * i) / dim);
      var ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
      base.push(b); keep.push(1 - ramp);
      inv.push((b / factor) * ramp + b * (1 - ramp));
    }
    var af = s.attention_factor;
    if (af === undefined || af === null) {
      af = s.mscale && s.mscale_all_dim ? yarnGetMscale(factor, s.mscale) / yarnGetMscale(factor, s.mscale_all_dim)
                                        : yarnGetMscale(factor);
    }
    return {base: base, invFreq: inv, keep: keep, low: low, high: high, attentionFactor: af};
  }

  // config.MLAConfig.softmax_scale
  function softmaxScale(qkHeadDim, s) {
    var scale = Math.pow(qkHeadDim, -0.5);
    if (s && s.mscale_all_dim) scale *= Math.pow(yarnGetMscale(s.factor, s.mscale_all_dim), 2);
    return scale;
  }

  // The FLOP counts mla.MultiHeadLatentAttention.uses_absorbed_path compares, per head, for T new
  // queries over S keys; only the parts that differ between the two paths.
  function absorbedFlops(c, T, S) { return T * S * 2 * (2 * c.d_c + c.d_h_R) + T * 2 * c.d_c * (c.d_h + c.d_v); }
  function expandedFlops(c, T, S) { return S * 2 * c.d_c * (c.d_h + c.d_v) + T * S * 2 * (c.d_h + c.d_h_R + c.d_v); }
  // mla.MultiHeadLatentAttention.uses_absorbed_path with absorb_prefill=None
  function usesAbsorbedPath(c, T, S) {
    if (T === 1) return true;
    return T * S * (2 * c.d_c - c.d_h - c.d_v) < (S - T) * c.d_c * (c.d_h + c.d_v);
  }
  // The largest T <= S that the rule computes absorbed (the rule is monotone in T).
  function crossover(c, S) {
    var lo = 1, hi = S; // usesAbsorbedPath(c, 1, S) is true
    if (usesAbsorbedPath(c, S, S)) return S;
    while (hi - lo > 1) {
      var mid = Math.floor((lo + hi) / 2);
      if (usesAbsorbedPath(c, mid, S)) lo = mid; else hi = mid;
    }
    return lo;
  }

  // --- formatting -----------------------------------------------------------------------------
  var INT = new Intl.NumberFormat("en-US", {maximumFractionDigits: 0});
  function fmtInt(x) { return INT.format(x); }
  function fmtSig(x, digits) {
    if (!isFinite(x)) return String(x);
    if (x === 0) return "0";
    var mag = Math.floor(Math.log10(Math.abs(x)));
    var decimals = Math.max(0, (digits || 3) - 1 - mag);
    return new Intl.NumberFormat("en-US", {maximumFractionDigits: decimals, minimumFractionDigits: decimals})
      .format(x);
  }
  function fmtBytes(b) {
    var units = [["TB", 1e12], ["GB", 1e9], ["MB", 1e6], ["KB", 1e3]];
    for (var i = 0; i < units.length; i++) {
      if (b >= units[i][1]) return fmtSig(b / units[i][1], 3) + " " + units[i][0];
    }
    return fmtSig(b, 3) + " B";
  }
  function fmtFlops(f) {
    var units = [["TFLOP", 1e12], ["GFLOP", 1e9], ["MFLOP", 1e6], ["kFLOP", 1e3]];
    for (var i = 0; i < units.length; i++) {
      if (f >= units[i][1]) return fmtSig(f / units[i][1], 3) + " " + units[i][0];
    }
    return fmtInt(f) + " FLOP";
  }

  // --- DOM helpers ----------------------------------------------------------------------------
  var SVGNS = "http://www.w3.org/2000/svg";
  var uid = 0;

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) e.appendChild(c); });
    return e;
  }
  function svgEl(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // A labelled control. kind: "number" | "select" | "log-slider" (a number input paired with a
  // slider over powers of two).
  function field(spec) {
    var id = "if-" + (++uid), input;
    if (spec.kind === "select") {
      input = el("select", {id: id, "data-control": spec.name});
      spec.options.forEach(function (o) {
        if (o.group) {
          var g = el("optgroup", {label: o.group});
          o.options.forEach(function (p) { g.appendChild(el("option", {value: p.value, text: p.label})); });
          input.appendChild(g);
        } else {
          input.appendChild(el("option", {value: o.value, text: o.label}));
        }
      });
    } else {
      input = el("input", {id: id, type: "number", "data-control": spec.name, min: spec.min, step: spec.step || 1,
                           inputmode: (spec.step || 1) % 1 ? "decimal" : "numeric"});
      if (spec.max !== undefined) input.setAttribute("max", spec.max);
    }
    var box = el("div", {"class": "if-field" + (spec.wide ? " if-wide" : "")},
                 [el("label", {"for": id, text: spec.label, title: spec.help || ""}), input]);
    if (spec.kind === "log-slider") {
      var slider = el("input", {type: "range", min: spec.minExp, max: spec.maxExp, step: 1,
                                "aria-label": spec.label + " (powers of two)", "data-slider": spec.name});
      slider.addEventListener("input", function () {
        input.value = Math.pow(2, Number(slider.value));
        input.dispatchEvent(new Event("input", {bubbles: true}));
      });
      input.addEventListener("input", function () {
        var v = Number(input.value);
        if (v > 0) slider.value = Math.round(Math.log2(v));
      });
      box.appendChild(slider);
      box.classList.add("if-slider-field");
    } else if (spec.kind === "slider") {
      var lin = el("input", {type: "range", min: spec.min, max: spec.max, step: spec.step || 1,
                             "aria-label": spec.label, "data-slider": spec.name});
      lin.addEventListener("input", function () {
        input.value = lin.value;
        input.dispatchEvent(new Event("input", {bubbles: true}));
      });
      input.addEventListener("input", function () { lin.value = input.value; });
      box.appendChild(lin);
      box.classList.add("if-slider-field");
    }
    return {box: box, input: input};
  }

  function controls(root, specs) {
    var grid = el("div", {"class": "if-controls"}), inputs = {};
    specs.forEach(function (s) {
      if (s.heading) { grid.appendChild(el("div", {"class": "if-heading", text: s.heading})); return; }
      var f = field(s);
      inputs[s.name] = f.input;
      grid.appendChild(f.box);
    });
    root.appendChild(grid);
    return inputs;
  }

  // Results: a definition list; set(name, value, text) writes the number and its text.
  function results(root) {
    var dl = el("dl", {"class": "if-results"}), rows = {};
    root.appendChild(dl);
    return {
      row: function (name, label) {
        var dd = el("dd", {"data-output": name});
        var dt = el("dt", {text: label});
        dl.appendChild(dt); dl.appendChild(dd);
        rows[name] = {dt: dt, dd: dd};
      },
      set: function (name, value, text) {
        var r = rows[name];
        r.dd.setAttribute("data-value", value === null ? "" : String(value));
        r.dd.textContent = text;
      },
      show: function (name, visible) {
        rows[name].dt.hidden = !visible; rows[name].dd.hidden = !visible;
      }
    };
  }

  function num(input) { return Number(input.value); }
  function positiveInt(input) {
    var v = Number(input.value);
    return Number.isInteger(v) && v > 0 ? v : NaN;
  }

  // --- a small line chart in SVG --------------------------------------------------------------
  // series: [{points: [[x, y], ...], cls, label}]; opts: {logX, logY, xLabel, yLabel, vlines, hlines, bands, dots}
  function lineChart(svg, width, height, series, opts) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("width", width); svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    var m = {left: 62, right: 22, top: 10, bottom: 42};
    var w = width - m.left - m.right, h = height - m.top - m.bottom;
    var xs = [], ys = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    (opts.hlines || []).forEach(function (l) { ys.push(l.y); });
    var x0 = opts.xMin !== undefined ? opts.xMin : Math.min.apply(null, xs);
    var x1 = opts.xMax !== undefined ? opts.xMax : Math.max.apply(null, xs);
    var y0 = opts.yMin !== undefined ? opts.yMin : Math.min.apply(null, ys);
    var y1 = opts.yMax !== undefined ? opts.yMax : Math.max.apply(null, ys);
    if (opts.logY) { y0 = Math.pow(10, Math.floor(Math.log10(y0))); y1 = Math.pow(10, Math.ceil(Math.log10(y1))); }
    else { y0 = Math.min(0, y0); y1 = y1 > y0 ? y1 * 1.05 : y0 + 1; }
    if (x1 === x0) x1 = x0 + 1;
    function fx(x) {
      var t = opts.logX ? (Math.log(x) - Math.log(x0)) / (Math.log(x1) - Math.log(x0)) : (x - x0) / (x1 - x0);
      return m.left + t * w;
    }
    function fy(y) {
      var t = opts.logY ? (Math.log(y) - Math.log(y0)) / (Math.log(y1) - Math.log(y0)) : (y - y0) / (y1 - y0);
      return m.top + h - t * h;
    }
    var g = svgEl("g", {"class": "if-axes"});
    svg.appendChild(g);
    (opts.bands || []).forEach(function (b) {
      var a = fx(Math.max(b.from, x0)), z = fx(Math.min(b.to, x1));
      if (z > a) g.appendChild(svgEl("rect", {x: a, y: m.top, width: z - a, height: h, "class": b.cls}));
    });
    // ticks
    var yt = [];
    if (opts.logY) { for (var e = Math.log10(y0); e <= Math.log10(y1) + 1e-9; e++) yt.push(Math.pow(10, e)); }
    else { var step = niceStep((y1 - y0) / 4); for (var v = 0; v <= y1 + 1e-9; v += step) yt.push(v); }
    if (opts.logY && yt.length > 7) yt = yt.filter(function (_, i) { return i % 2 === 0; });
    yt.forEach(function (v) {
      g.appendChild(svgEl("line", {x1: m.left, x2: m.left + w, y1: fy(v), y2: fy(v), "class": "if-grid"}));
      g.appendChild(svgEl("text", {x: m.left - 6, y: fy(v) + 4, "text-anchor": "end"}, opts.yTick ? opts.yTick(v) : tick(v)));
    });
    var xt = [];
    if (opts.logX) {
      for (var p = Math.ceil(Math.log2(x0)); p <= Math.floor(Math.log2(x1)); p++) xt.push(Math.pow(2, p));
      var every = Math.ceil(xt.length / Math.max(2, Math.floor(w / 56)));
      xt = xt.filter(function (_, i) { return i % every === 0; });
    } else {
      var xs2 = niceStep((x1 - x0) / Math.max(2, Math.floor(w / 70)));
      for (var u = Math.ceil(x0 / xs2) * xs2; u <= x1 + 1e-9; u += xs2) xt.push(u);
    }
    xt.forEach(function (v) {
      g.appendChild(svgEl("line", {x1: fx(v), x2: fx(v), y1: m.top + h, y2: m.top + h + 4, "class": "if-tick"}));
      g.appendChild(svgEl("text", {x: fx(v), y: m.top + h + 16, "text-anchor": "middle"}, tick(v)));
    });
    g.appendChild(svgEl("rect", {x: m.left, y: m.top, width: w, height: h, "class": "if-frame"}));
    g.appendChild(svgEl("text", {x: m.left + w / 2, y: height - 6, "text-anchor": "middle", "class": "if-label"},
                        opts.xLabel));
    g.appendChild(svgEl("text", {x: 12, y: m.top + h / 2, "text-anchor": "middle", "class": "if-label",
                                 transform: "rotate(-90 12 " + (m.top + h / 2) + ")"}, opts.yLabel));
    (opts.hlines || []).forEach(function (l) {
      if (l.y < y0 || l.y > y1) return;
      g.appendChild(svgEl("line", {x1: m.left, x2: m.left + w, y1: fy(l.y), y2: fy(l.y), "class": l.cls}));
      g.appendChild(svgEl("text", {x: m.left + 4, y: fy(l.y) - 4, "class": "if-note"}, l.label));
    });
    (opts.vlines || []).forEach(function (l) {
      if (l.x < x0 || l.x > x1) return;
      g.appendChild(svgEl("line", {x1: fx(l.x), x2: fx(l.x), y1: m.top, y2: m.top + h, "class": l.cls}));
      var right = fx(l.x) > m.left + w * 0.6;
      g.appendChild(svgEl("text", {x: fx(l.x) + (right ? -4 : 4), y: l.middle ? m.top + h / 2 : m.top + 14, "class": "if-note",
                                   "text-anchor": right ? "end" : "start"}, l.label));
    });
    series.forEach(function (s) {
      var d = s.points.filter(function (p) { return !opts.logY || p[1] > 0; })
        .map(function (p, i) { return (i ? "L" : "M") + fx(p[0]).toFixed(1) + "," + fy(p[1]).toFixed(1); }).join("");
      g.appendChild(svgEl("path", {d: d, "class": "if-line " + s.cls}));
    });
    (opts.dots || []).forEach(function (p) {
      g.appendChild(svgEl("circle", {cx: fx(p.x), cy: fy(p.y), r: 4, "class": "if-dot " + p.cls}));
    });
    // legend
    var lx = m.left + 8, ly = m.top + (opts.legendBottom ? h - 8 - 14 * (series.length - 1) : 14);
    series.forEach(function (s, i) {
      g.appendChild(svgEl("line", {x1: lx, x2: lx + 18, y1: ly + 14 * i - 4, y2: ly + 14 * i - 4, "class": "if-line " + s.cls}));
      g.appendChild(svgEl("text", {x: lx + 24, y: ly + 14 * i, "class": "if-legend"}, s.label));
    });
  }
  function niceStep(raw) {
    var p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }
  function tick(v) {
    var a = Math.abs(v);
    if (a >= 1e12) return fmtSig(v / 1e12, 2).replace(/\.0+$/, "") + "T";
    if (a >= 1e9) return fmtSig(v / 1e9, 2).replace(/\.0+$/, "") + "G";
    if (a >= 1e6) return fmtSig(v / 1e6, 2).replace(/\.0+$/, "") + "M";
    if (a >= 1e4) return fmtSig(v / 1e3, 2).replace(/\.0+$/, "") + "k";
    if (a >= 1 || a === 0) return fmtInt(v);
    return String(Number(v.toPrecision(2)));
  }

  function chartBox(root, label) {
    var svg = svgEl("svg", {role: "img", "aria-label": label, "class": "if-chart"});
    var box = el("div", {"class": "if-chart-box"});
    box.appendChild(svg);
    root.appendChild(box);
    return {svg: svg, width: function () { return Math.max(280, Math.floor(box.clientWidth)); }};
  }

  function presetOptions(kinds) {
    var groups = [];
    if (kinds.indexOf("mla") >= 0) {
      groups.push({group: "MLA (MLAConfig presets)", options: DATA.presets.filter(function (p) { return p.kind === "mla"; })
        .map(function (p) { return {value: p.name, label: p.name}; })});
    }
    if (kinds.indexOf("standard") >= 0) {
      groups.push({group: "MHA / GQA (ATTENTION_PRESETS)", options: DATA.presets.filter(function (p) { return p.kind === "standard"; })
        .map(function (p) { return {value: p.name, label: p.name + " (" + kindName(p) + ")"}; })});
    }
    groups.push({value: "custom", label: "custom"});
    return groups;
  }
  function kindName(p) { return p.n_kv === p.n_h ? "MHA" : p.n_kv === 1 ? "MQA" : "GQA-" + p.n_kv; }
  function preset(name) { return DATA.presets.filter(function (p) { return p.name === name; })[0]; }
  // Editing a field the preset set switches the preset menu to "custom" (events a figure
  // dispatches itself while loading a preset are not the reader's edits: they do not bubble).
  function markCustom(inputs, keys) {
    keys.forEach(function (k) {
      inputs[k].addEventListener("input", function (e) { if (e.bubbles) inputs.preset.value = "custom"; });
      inputs[k].addEventListener("change", function (e) { if (e.bubbles && k === "attention") inputs.preset.value = "custom"; });
    });
  }

  // --- figure 1: the cache and throughput explorer --------------------------------------------
  function cacheExplorer(root, options) {
    var accs = DATA.accelerators;
    var inputs = controls(root, [
      {heading: "Model"},
      {name: "preset", label: "preset", kind: "select", options: presetOptions(["mla", "standard"]), wide: true},
      {name: "attention", label: "attention", kind: "select",
       options: [{value: "mla", label: "MLA"}, {value: "standard", label: "MHA / GQA / MQA"}]},
      {name: "mode", label: "MLA cache and decode", kind: "select",
       options: [{value: "absorbed", label: "latent, absorbed decode"}, {value: "latent", label: "latent, re-expanded each step"},
                 {value: "expanded", label: "expanded per-head K, V"}]},
      {name: "n_h", label: "heads n_h", min: 1},
      {name: "n_kv", label: "K/V heads n_kv", min: 1},
      {name: "d_h", label: "head dim d_h", min: 1, help: "MLA: qk_nope_head_dim"},
      {name: "d_c", label: "latent d_c", min: 1, help: "kv_lora_rank"},
      {name: "d_h_R", label: "RoPE key d_h_R", min: 2, step: 2, help: "qk_rope_head_dim"},
      {name: "d_v", label: "value dim d_v", min: 1, help: "v_head_dim"},
      {name: "layers", label: "layers", min: 1},
      {heading: "Workload"},
      {name: "context", label: "context (tokens)", kind: "log-slider", min: 1, minExp: 7, maxExp: 20},
      {name: "batch", label: "batch (sequences)", kind: "log-slider", min: 1, minExp: 0, maxExp: 14},
      {name: "dtype", label: "cache dtype", kind: "select",
       options: DATA.dtypes.map(function (d) { return {value: String(d.bytes), label: d.name + " (" + d.bytes + " B)"}; })},
      {heading: "Hardware and weights"},
      {name: "accelerator", label: "accelerator", kind: "select",
       options: accs.map(function (a) { return {value: a.name, label: a.name}; }).concat([{value: "custom", label: "custom"}])},
      {name: "count", label: "devices", min: 1},
      {name: "memory_gb", label: "memory per device (GB)", min: 0.001, step: "any"},
      {name: "usable", label: "usable memory (%)", min: 1, max: 100, step: "any"},
      {name: "bandwidth_tbs", label: "bandwidth per device (TB/s)", min: 0.001, step: "any"},
      {name: "peak_tflops", label: "peak per device (TFLOP/s)", min: 0.001, step: "any"},
      {name: "total_b", label: "parameters (billions)", min: 0, step: "any"},
      {name: "active_b", label: "active per token (billions)", min: 0, step: "any"},
      {name: "weight_bytes", label: "bytes per weight", kind: "select",
       options: [{value: "1", label: "1 (FP8)"}, {value: "2", label: "2 (BF16)"}, {value: "4", label: "4 (FP32)"}]}
    ]);
    var out = results(root);
    [["cache_elements", "cache per token per layer"], ["cache_bytes_per_token", "cache per token, all layers"],
     ["vs_mha", "vs MHA with the same heads"], ["cache_total", "cache for this batch and context"],
     ["weights", "weights"], ["room", "memory left for the cache"], ["max_batch", "largest batch that fits"],
     ["step", "decode step at this batch"], ["tokens_per_s", "throughput at this batch"],
     ["max_tokens_per_s", "throughput at the largest batch"], ["intensity", "attention FLOPs per byte of cache"]]
      .forEach(function (r) { out.row(r[0], r[1]); });
    var note = el("p", {"class": "if-note-text"});
    root.appendChild(note);
    var chart = chartBox(root, "decode throughput against batch size");

    function loadPreset(name) {
      var p = preset(name);
      if (!p) return;
      inputs.attention.value = p.kind;
      ["n_h", "d_h", "layers"].forEach(function (k) { inputs[k].value = p[k]; });
      if (p.kind === "mla") { ["d_c", "d_h_R", "d_v"].forEach(function (k) { inputs[k].value = p[k]; }); inputs.n_kv.value = p.n_h; }
      else { inputs.n_kv.value = p.n_kv; }
      var w = p.model;
      inputs.total_b.value = w ? w.total_params / 1e9 : "";
      inputs.active_b.value = w ? w.active_params / 1e9 : "";
      if (w) { inputs.weight_bytes.value = String(w.weight_bytes_per_param); inputs.dtype.value = String(w.cache_bytes_per_element); }
    }
    function loadAccelerator(name) {
      var a = accs.filter(function (x) { return x.name === name; })[0];
      if (!a) return;
      inputs.memory_gb.value = a.memory_bytes / 1e9;
      inputs.bandwidth_tbs.value = a.bandwidth_bytes_per_s / 1e12;
      inputs.peak_tflops.value = a.peak_flops_per_s / 1e12;
    }

    function update() {
      var kind = inputs.attention.value, mode = inputs.mode.value;
      root.querySelectorAll("[data-control=n_kv]").forEach(function (e) { e.parentElement.hidden = kind !== "standard"; });
      ["d_c", "d_h_R", "d_v", "mode"].forEach(function (k) { inputs[k].parentElement.hidden = kind !== "mla"; });
      var c = {kind: kind, n_h: positiveInt(inputs.n_h), n_kv: positiveInt(inputs.n_kv), d_h: positiveInt(inputs.d_h),
               d_c: positiveInt(inputs.d_c), d_h_R: positiveInt(inputs.d_h_R), d_v: positiveInt(inputs.d_v),
               layers: positiveInt(inputs.layers)};
      var context = positiveInt(inputs.context), batch = positiveInt(inputs.batch), bpe = num(inputs.dtype);
      var needed = kind === "mla" ? ["n_h", "d_h", "d_c", "d_h_R", "d_v", "layers"] : ["n_h", "n_kv", "d_h", "layers"];
      var bad = needed.filter(function (k) { return isNaN(c[k]); });
      if (isNaN(context)) bad.push("context");
      if (isNaN(batch)) bad.push("batch");
      if (kind === "standard" && !bad.length && c.n_h % c.n_kv) bad.push("n_kv (must divide n_h)");
      if (kind === "mla" && !bad.length && c.d_h_R % 2) bad.push("d_h_R (must be even)");
      if (bad.length) {
        note.textContent = "Fix: " + bad.join(", ") + " (positive whole numbers).";
        Object.keys({cache_elements: 1, cache_bytes_per_token: 1, vs_mha: 1, cache_total: 1, weights: 1, room: 1,
                     max_batch: 1, step: 1, tokens_per_s: 1, max_tokens_per_s: 1, intensity: 1})
          .forEach(function (k) { out.set(k, null, "—"); });
        return;
      }
      var m = kind === "mla" ? mode : undefined;
      var elems = kvCacheElements(c, m), perToken = elems * c.layers * bpe;
      out.set("cache_elements", elems, fmtInt(elems) + " values");
      out.set("cache_bytes_per_token", perToken, fmtInt(perToken) + " B (" + fmtBytes(perToken) + ")");
      var mha = {kind: "standard", n_h: c.n_h, n_kv: c.n_h, d_h: kind === "mla" ? c.d_v : c.d_h};
      var ratio = kvCacheElements(mha) / elems;
      out.set("vs_mha", ratio, fmtSig(ratio, 3) + "x smaller" + (kind === "mla" ? " (MHA with head dim d_v)" : ""));
      var total = perToken * context * batch;
      out.set("cache_total", total, fmtBytes(total));
      // a listed accelerator: the package's exact figures; edited fields make it "custom"
      var acc = accs.filter(function (x) { return x.name === inputs.accelerator.value; })[0] ||
                {memory_bytes: num(inputs.memory_gb) * 1e9, bandwidth_bytes_per_s: num(inputs.bandwidth_tbs) * 1e12,
                 peak_flops_per_s: num(inputs.peak_tflops) * 1e12};
      var hw = node(acc, positiveInt(inputs.count), num(inputs.usable) / 100);
      var attnBytes = kvCacheElements(c, m) * bpe;
      var intensity = attentionFlopsPerCachedToken(c, m) / attnBytes;
      var ridge = hw.peak_flops_per_s / hw.bandwidth_bytes_per_s;
      out.set("intensity", intensity, fmtSig(intensity, 3) + " (ridge point of this hardware: " + fmtSig(ridge, 3) + ")");
      var total_params = num(inputs.total_b) * 1e9, active = num(inputs.active_b) * 1e9;
      var hwOk = hw.usable_memory_bytes > 0 && hw.bandwidth_bytes_per_s > 0 && hw.peak_flops_per_s > 0;
      if (!(inputs.total_b.value !== "" && inputs.active_b.value !== "" && active > 0 && active <= total_params && hwOk)) {
        note.textContent = !hwOk ? "Fix the hardware fields (positive numbers)."
          : "Enter the model's parameters (stored and active per token, 0 < active <= stored) for the batch and "
            + "throughput; the package's roofline models only DeepSeek 67B, V2 and V3.";
        ["weights", "room", "max_batch", "step", "tokens_per_s", "max_tokens_per_s"].forEach(function (k) { out.set(k, null, "—"); });
        lineChart(chart.svg, chart.width(), 60, [], {xLabel: "", yLabel: "", xMin: 1, xMax: 2, yMin: 0, yMax: 1});
        return;
      }
      note.textContent = "Roofline bound: a step reads the weights its batch touches and every sequence's cache, "
        + "and takes max(bytes / bandwidth, FLOPs / peak); the hardware figures are datasheet values. "
        + "An upper bound on throughput, good for comparing models on the same hardware.";
      var model = decodeModel(c, m, {total_params: total_params, active_params: active,
                                     weight_bytes_per_param: num(inputs.weight_bytes), cache_bytes_per_element: bpe});
      out.set("weights", model.weight_bytes, fmtBytes(model.weight_bytes));
      var room = hw.usable_memory_bytes - model.weight_bytes;
      out.set("room", room, room > 0 ? fmtBytes(room) + " of " + fmtBytes(hw.usable_memory_bytes) + " usable"
                                     : "none: the weights do not fit");
      var mb = maxBatch(model, hw, context);
      out.set("max_batch", mb, fmtInt(mb) + (mb === 1 ? " sequence" : " sequences") + " of " + fmtInt(context) + " tokens");
      var st = decodeStep(model, hw, batch, context);
      out.set("step", st.step_time_s, fmtSig(st.step_time_s * 1e3, 3) + " ms, " + st.bound + "-bound"
              + (batch > mb ? " (this batch does not fit in memory)" : ""));
      out.set("tokens_per_s", st.tokens_per_s, fmtInt(st.tokens_per_s) + " tokens/s");
      var best = decodeStep(model, hw, mb, context);
      out.set("max_tokens_per_s", best.tokens_per_s, mb ? fmtInt(best.tokens_per_s) + " tokens/s (" + best.bound + "-bound)"
                                                        : "0: nothing fits");
      // chart: throughput against batch, up to past the largest batch
      var xMax = Math.max(2, mb * 2, batch * 2), pts = [];
      for (var i = 0; i <= 120; i++) {
        var b = Math.max(1, Math.round(Math.pow(xMax, i / 120)));
        pts.push([b, decodeStep(model, hw, b, context).tokens_per_s]);
      }
      lineChart(chart.svg, chart.width(), 250, [{points: pts, cls: "if-a", label: "roofline throughput"}], {
        logX: true, xMin: 1, xMax: xMax, xLabel: "batch (sequences of " + fmtInt(context) + " tokens)",
        yLabel: "tokens/s", bands: mb < xMax ? [{from: Math.max(mb, 1), to: xMax, cls: "if-band-no"}] : [],
        vlines: mb >= 1 ? [{x: mb, cls: "if-marker", label: "largest batch " + fmtInt(mb), middle: true}] : [],
        dots: [{x: batch, y: st.tokens_per_s, cls: "if-a"}], legendBottom: true});
    }

    inputs.preset.addEventListener("change", function () { loadPreset(inputs.preset.value); update(); });
    inputs.accelerator.addEventListener("change", function () { loadAccelerator(inputs.accelerator.value); update(); });
    markCustom(inputs, ["attention", "n_h", "n_kv", "d_h", "d_c", "d_h_R", "d_v", "layers", "total_b", "active_b"]);
    ["memory_gb", "bandwidth_tbs", "peak_tflops"].forEach(function (k) {
      inputs[k].addEventListener("input", function (e) { if (e.bubbles) inputs.accelerator.value = "custom"; });
    });
    root.addEventListener("input", update);
    root.addEventListener("change", update);

    // DeepSeek-V2 on the paper's node of 8 H800s: the setting of the paper's throughput figure
    var start = options.preset && preset(options.preset) ? options.preset : "DeepSeek-V2";
    inputs.preset.value = start;
    loadPreset(start);
    inputs.mode.value = "absorbed";
    inputs.context.value = DATA.paper_context; inputs.context.dispatchEvent(new Event("input"));
    inputs.batch.value = 64; inputs.batch.dispatchEvent(new Event("input"));
    inputs.accelerator.value = DATA.node.accelerator; loadAccelerator(DATA.node.accelerator);
    inputs.count.value = DATA.node.count;
    inputs.usable.value = DATA.node.usable_memory_fraction * 100;
    update();
    return update;
  }

  // --- figure 2: YaRN's frequency ramp ---------------------------------------------------------
  function yarnRamp(root, options) {
    var yarnPresets = DATA.presets.filter(function (p) { return p.kind === "mla" && p.rope_scaling; });
    var inputs = controls(root, [
      {name: "preset", label: "preset", kind: "select", wide: true, options: [{group: "MLA (MLAConfig presets)",
        options: yarnPresets.map(function (p) { return {value: p.name, label: p.name}; })}, {value: "custom", label: "custom"}]},
      {name: "factor", label: "scale factor s", kind: "slider", min: 1, max: 64, step: 1},
      {name: "original", label: "original context L", kind: "log-slider", min: 2, minExp: 6, maxExp: 17},
      {name: "d_h_R", label: "RoPE dims d_h_R", kind: "slider", min: 2, max: 256, step: 2},
      {name: "theta", label: "base theta", min: 1, step: "any"},
      {name: "beta_fast", label: "beta_fast (rotations)", min: 0.01, step: "any"},
      {name: "beta_slow", label: "beta_slow (rotations)", min: 0.01, step: "any"},
      {name: "mscale", label: "mscale", min: 0, step: "any"},
      {name: "mscale_all_dim", label: "mscale_all_dim", min: 0, step: "any"},
      {name: "d_h", label: "content head dim d_h", min: 1, help: "qk_nope_head_dim, for the softmax scale"}
    ]);
    var out = results(root);
    [["ramp", "ramp over pairs (low, high)"], ["kept", "pairs that keep their frequency"],
     ["blended", "pairs on the ramp"], ["interpolated", "pairs divided by s"],
     ["extended", "extended context s x L"], ["attention_factor", "cos/sin magnitude (attention_factor)"],
     ["softmax_scale", "softmax scale"]].forEach(function (r) { out.row(r[0], r[1]); });
    var chart = chartBox(root, "RoPE wavelength per pair, with and without YaRN");
    var chart2 = chartBox(root, "share of each pair's original frequency that YaRN keeps");

    function loadPreset(name) {
      var p = preset(name);
      if (!p) return;
      var s = p.rope_scaling;
      inputs.factor.value = s.factor; inputs.factor.dispatchEvent(new Event("input"));
      inputs.original.value = s.original_max_position_embeddings; inputs.original.dispatchEvent(new Event("input"));
      inputs.d_h_R.value = p.d_h_R; inputs.d_h_R.dispatchEvent(new Event("input"));
      inputs.theta.value = p.rope_theta;
      inputs.beta_fast.value = s.beta_fast; inputs.beta_slow.value = s.beta_slow;
      inputs.mscale.value = s.mscale === undefined ? "" : s.mscale;
      inputs.mscale_all_dim.value = s.mscale_all_dim === undefined ? "" : s.mscale_all_dim;
      inputs.d_h.value = p.d_h;
    }

    function update() {
      var dim = positiveInt(inputs.d_h_R), theta = num(inputs.theta), factor = num(inputs.factor);
      var s = {factor: factor, original_max_position_embeddings: num(inputs.original),
               beta_fast: num(inputs.beta_fast), beta_slow: num(inputs.beta_slow),
               mscale: inputs.mscale.value === "" ? undefined : num(inputs.mscale),
               mscale_all_dim: inputs.mscale_all_dim.value === "" ? undefined : num(inputs.mscale_all_dim)};
      if (isNaN(dim) || dim % 2 || !(theta > 1) || !(factor >= 1) || !(s.original_max_position_embeddings > 0)) {
        ["ramp", "kept", "blended", "interpolated", "extended", "attention_factor", "softmax_scale"]
          .forEach(function (k) { out.set(k, null, "—"); });
        return;
      }
      var y = yarnInvFreq(dim, theta, s);
      var kept = y.keep.filter(function (k) { return k === 1; }).length;
      var interp = y.keep.filter(function (k) { return k === 0; }).length;
      out.set("ramp", JSON.stringify([y.low, y.high]), "pairs " + fmtSig(y.low, 3) + " to " + fmtSig(y.high, 3));
      out.set("kept", kept, fmtInt(kept) + " of " + fmtInt(dim / 2));
      out.set("blended", dim / 2 - kept - interp, fmtInt(dim / 2 - kept - interp));
      out.set("interpolated", interp, fmtInt(interp));
      out.set("extended", factor * s.original_max_position_embeddings, fmtInt(factor * s.original_max_position_embeddings) + " tokens");
      out.set("attention_factor", y.attentionFactor, fmtSig(y.attentionFactor, 4));
      var dh = positiveInt(inputs.d_h), sc = softmaxScale(dh + dim, s);
      out.set("softmax_scale", sc, isNaN(dh) ? "—" : fmtSig(sc, 4) + " = 1/sqrt(" + (dh + dim) + ") x "
              + fmtSig(sc * Math.sqrt(dh + dim), 4));
      root.setAttribute("data-inv-freq", JSON.stringify(y.invFreq));
      var L = s.original_max_position_embeddings;
      var base = y.base.map(function (b, i) { return [i, 2 * Math.PI / b]; });
      var scaled = y.invFreq.map(function (f, i) { return [i, 2 * Math.PI / f]; });
      var band = [{from: y.low, to: Math.min(y.high, dim / 2 - 1), cls: "if-band"}];
      lineChart(chart.svg, chart.width(), 260,
        [{points: base, cls: "if-a", label: "RoPE wavelength"}, {points: scaled, cls: "if-b", label: "with YaRN"}],
        {logY: true, xMin: 0, xMax: Math.max(1, dim / 2 - 1), xLabel: "pair index i", yLabel: "wavelength (tokens)",
         hlines: [{y: L, cls: "if-marker", label: "L = " + fmtInt(L)},
                  {y: factor * L, cls: "if-marker-2", label: "s x L = " + fmtInt(factor * L)}],
         bands: band, yTick: tick});
      lineChart(chart2.svg, chart2.width(), 150,
        [{points: y.keep.map(function (k, i) { return [i, k]; }), cls: "if-b", label: "share kept (1 - ramp)"}],
        {xMin: 0, xMax: Math.max(1, dim / 2 - 1), yMin: 0, yMax: 1 / 1.05, xLabel: "pair index i", yLabel: "kept",
         bands: band, legendBottom: true});
    }
    inputs.preset.addEventListener("change", function () { loadPreset(inputs.preset.value); update(); });
    markCustom(inputs, ["factor", "original", "d_h_R", "theta", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "d_h"]);
    root.addEventListener("input", update);
    root.addEventListener("change", update);
    var start = options.preset && preset(options.preset) && preset(options.preset).rope_scaling ? options.preset : "DeepSeek-V3";
    inputs.preset.value = start;
    loadPreset(start);
    update();
    return update;
  }

  // --- figure 3: absorb or expand ---------------------------------------------------------------
  function absorbCrossover(root, options) {
    var inputs = controls(root, [
      {name: "preset", label: "preset", kind: "select", wide: true, options: presetOptions(["mla"])},
      {name: "S", label: "keys S (cached + new)", kind: "log-slider", min: 1, minExp: 4, maxExp: 20},
      {name: "T", label: "new queries T", kind: "log-slider", min: 1, minExp: 0, maxExp: 20},
      {name: "n_h", label: "heads n_h", min: 1},
      {name: "d_c", label: "latent d_c", min: 1},
      {name: "d_h", label: "head dim d_h", min: 1},
      {name: "d_v", label: "value dim d_v", min: 1},
      {name: "d_h_R", label: "RoPE key d_h_R", min: 2, step: 2}
    ]);
    var out = results(root);
    [["absorbed", "absorbed: scores and values on the latent"], ["expanded", "expanded: per-head K and V first"],
     ["difference", "absorbed minus expanded"], ["choice", "the layer computes"],
     ["crossover", "absorbed up to T ="]].forEach(function (r) { out.row(r[0], r[1]); });
    var chart = chartBox(root, "FLOPs of the absorbed and expanded paths against new queries");

    function loadPreset(name) {
      var p = preset(name);
      if (!p) return;
      ["n_h", "d_c", "d_h", "d_v", "d_h_R"].forEach(function (k) { inputs[k].value = p[k]; });
    }
    function update() {
      var c = {n_h: positiveInt(inputs.n_h), d_c: positiveInt(inputs.d_c), d_h: positiveInt(inputs.d_h),
               d_v: positiveInt(inputs.d_v), d_h_R: positiveInt(inputs.d_h_R)};
      var S = positiveInt(inputs.S), T = positiveInt(inputs.T);
      var bad = Object.keys(c).filter(function (k) { return isNaN(c[k]); });
      if (isNaN(S)) bad.push("S");
      if (isNaN(T) || T > S) bad.push("T (at most S)");
      if (bad.length) {
        ["absorbed", "expanded", "difference", "choice", "crossover"].forEach(function (k) { out.set(k, null, "—"); });
        out.set("choice", null, "fix: " + bad.join(", "));
        return;
      }
      var a = c.n_h * absorbedFlops(c, T, S), e = c.n_h * expandedFlops(c, T, S);
      out.set("absorbed", a, fmtFlops(a));
      out.set("expanded", e, fmtFlops(e));
      out.set("difference", a - e, (a - e < 0 ? "−" : "+") + fmtFlops(Math.abs(a - e)) + " (" + fmtSig(a / e, 3) + "x)");
      var abs = usesAbsorbedPath(c, T, S);
      out.set("choice", abs ? "absorbed" : "expanded", abs ? "the absorbed path" : "the expanded path");
      var tStar = crossover(c, S);
      out.set("crossover", tStar, fmtInt(tStar) + (tStar === S ? " (always, at this S)" : " new queries at this S"));
      var pa = [], pe = [], n = Math.min(160, S);
      for (var i = 0; i <= n; i++) {
        var t = Math.max(1, Math.round(Math.pow(S, i / n)));
        pa.push([t, c.n_h * absorbedFlops(c, t, S)]); pe.push([t, c.n_h * expandedFlops(c, t, S)]);
      }
      lineChart(chart.svg, chart.width(), 260,
        [{points: pa, cls: "if-a", label: "absorbed"}, {points: pe, cls: "if-b", label: "expanded"}],
        {logX: true, logY: true, xMin: 1, xMax: Math.max(2, S), xLabel: "new queries T (S = " + fmtInt(S) + " keys)",
         yLabel: "FLOPs per layer", vlines: tStar < S ? [{x: tStar, cls: "if-marker", label: "T = " + fmtInt(tStar)}] : [],
         dots: [{x: T, y: a, cls: "if-a"}, {x: T, y: e, cls: "if-b"}], legendBottom: false});
    }
    inputs.preset.addEventListener("change", function () { loadPreset(inputs.preset.value); update(); });
    markCustom(inputs, ["n_h", "d_c", "d_h", "d_v", "d_h_R"]);
    root.addEventListener("input", update);
    root.addEventListener("change", update);
    var start = options.preset && preset(options.preset) && preset(options.preset).kind === "mla" ? options.preset : "DeepSeek-V3";
    inputs.preset.value = start;
    loadPreset(start);
    inputs.S.value = DATA.paper_context; inputs.S.dispatchEvent(new Event("input"));
    inputs.T.value = 16; inputs.T.dispatchEvent(new Event("input"));
    update();
    return update;
  }

  var FIGURES = {"cache-explorer": cacheExplorer, "yarn-ramp": yarnRamp, "absorb-crossover": absorbCrossover};

  function init() {
    if (!DATA) { console.warn("interactive figures: window.MLA_BOOK_DATA is missing"); return; }
    document.querySelectorAll(".interactive-figure").forEach(function (root) {
      var draw = FIGURES[root.getAttribute("data-figure")];
      if (!draw) return;
      root.textContent = "";
      var options = JSON.parse(root.getAttribute("data-options") || "{}");
      var redraw = draw(root, options);
      root.setAttribute("data-ready", "true");
      if (window.ResizeObserver) {
        var last = root.clientWidth;
        new ResizeObserver(function () {
          if (Math.abs(root.clientWidth - last) > 4) { last = root.clientWidth; redraw(); }
        }).observe(root);
      }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
