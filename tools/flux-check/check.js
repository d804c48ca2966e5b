// Reads a JSON array of Flux scripts on stdin; prints a JSON array of {syntax, semantic}.
// syntax: the parser accepts it; semantic: types and builtin signatures check out too.
const { Flux, is_valid_flux } = require("@influxdata/flux-lsp-node");

let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  const results = JSON.parse(input).map((script) => {
    const flux = new Flux(script);
    try {
      return { syntax: is_valid_flux(script), semantic: flux.is_valid() };
    } finally {
      flux.free();
    }
  });
  process.stdout.write(JSON.stringify(results));
});
