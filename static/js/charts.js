// The dashboard's charts, drawn with Chart.js from the numbers in the page's json_script block
// (#dashboard-charts). The same numbers are in the tables below each chart. Money arrives as text
// (exact decimals) and is only turned into numbers here, to draw.
(function () {
  "use strict";
  function draw() {
    const source = document.getElementById("dashboard-charts");
    if (!source || !window.Chart) return;
    const data = JSON.parse(source.textContent);
    const numbers = (values) => values.map(Number);
    const common = {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      plugins: {legend: {display: false}},
      scales: {y: {beginAtZero: true}},
    };
    const spend = document.getElementById("spend-chart");
    if (spend) {
      new Chart(spend, {
        type: "bar",
        data: {
          labels: data.spend.labels.map((day) => day.slice(5)),  // MM-DD: thirty of them fit a phone
          datasets: [{label: data.text.spend, data: numbers(data.spend.values), backgroundColor: "#0d6efd"}],
        },
        options: common,
      });
      spend.dataset.drawn = "true";
    }
    const gpu = document.getElementById("gpu-chart");
    if (gpu) {
      new Chart(gpu, {
        type: "bar",
        data: {
          labels: data.gpu.labels,
          datasets: [
            {label: data.text.task, data: numbers(data.gpu.task), backgroundColor: "#198754"},
            {label: data.text.vm, data: numbers(data.gpu.vm), backgroundColor: "#fd7e14"},
          ],
        },
        options: {
          ...common,
          plugins: {legend: {display: true, position: "bottom"}},
          scales: {x: {stacked: true}, y: {stacked: true, beginAtZero: true}},
        },
      });
      gpu.dataset.drawn = "true";
    }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
