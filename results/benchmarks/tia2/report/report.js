(function () {
  'use strict';
  function value(cell, numeric) {
    var v = cell ? cell.getAttribute('data-v') : '';
    if (!numeric) return (v || '').toLowerCase();
    return v === '' || v === null ? NaN : parseFloat(v);
  }
  function sortTable(table, col, th) {
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var dir = current ? (current === 'descending' ? 'ascending' : 'descending')
                      : (numeric && !th.getAttribute('data-low') ? 'descending' : 'ascending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return [value(r.cells[col], numeric), i, r]; });
    keyed.sort(function (a, b) {
      var x = a[0], y = b[0];
      if (numeric) {
        if (isNaN(x) && isNaN(y)) return a[1] - b[1];
        if (isNaN(x)) return 1;
        if (isNaN(y)) return -1;
      }
      var c = x < y ? -1 : x > y ? 1 : 0;
      return (dir === 'ascending' ? c : -c) || a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
  }
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.addEventListener('click', function () { sortTable(table, col, th); });
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sortTable(table, col, th); });
    });
  });

  var methods = JSON.parse(document.body.getAttribute('data-methods') || '[]');
  if (!methods.length) return;
  function chosen() {
    var m = /(?:^|&)method=([^&]*)/.exec(location.hash.slice(1));
    var name = m ? decodeURIComponent(m[1]) : methods[0];
    return methods.indexOf(name) >= 0 ? name : methods[0];
  }
  function apply(name) {
    var i = methods.indexOf(name);
    var grid = document.getElementById('cards');
    if (grid) {
      var cards = Array.prototype.slice.call(grid.querySelectorAll('.card'));
      var half = grid.querySelector('.half');
      cards.forEach(function (c) {
        var r = JSON.parse(c.getAttribute('data-r'))[i];
        c.className = 'card card-' + r[3];
        c.querySelector('.pos').textContent = r[1];
        c.querySelector('.score').textContent = 'score ' + (r[0] === null ? '–' : Number(r[0]).toPrecision(4));
        c.setAttribute('data-pos', r[1]);
      });
      cards.sort(function (a, b) { return a.getAttribute('data-pos') - b.getAttribute('data-pos'); });
      var mid = Math.floor(cards.length / 2);
      cards.forEach(function (c, k) {
        grid.appendChild(c);
        if (half && k === mid - 1) grid.appendChild(half);
      });
    }
    Array.prototype.forEach.call(document.querySelectorAll('.method-view'), function (s) {
      s.hidden = s.getAttribute('data-method') !== name;
    });
    var select = document.getElementById('method');
    if (select) select.value = name;
  }
  var select = document.getElementById('method');
  if (select) {
    select.addEventListener('change', function () {
      location.hash = 'method=' + encodeURIComponent(select.value);
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll('a.keep-method'), function (a) {
    a.addEventListener('click', function () {
      var href = a.getAttribute('href').split('#')[0];
      a.setAttribute('href', href + '#method=' + encodeURIComponent(chosen()));
    });
  });
  window.addEventListener('hashchange', function () { apply(chosen()); });
  apply(chosen());
})();
