// Compile every .sol file of the given folders with solc-js (standard JSON).
//
//   node compile.mjs [--sources DIR]... [--node-modules DIR] [--out FILE]
//
// Prints (or writes to FILE) {ContractName: {abi, bytecode, deployedBytecode}}
// for the contracts defined in the --sources folders (default: this script's
// folder). File names must be unique across the folders: each file is one source
// unit named by its file name, so `./X.sol` imports resolve across them.
// `@openzeppelin/...` imports are read from DIR (default: the first node_modules
// found walking up from the current directory, then from this script's directory).
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));

function parseArgs(argv) {
  const args = { sources: [], nodeModules: null, out: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--sources") args.sources.push(argv[++i]);
    else if (argv[i] === "--node-modules") args.nodeModules = argv[++i];
    else if (argv[i] === "--out") args.out = argv[++i];
    else throw new Error(`unknown argument ${argv[i]}`);
  }
  return args;
}

function findNodeModules(start) {
  for (let dir = path.resolve(start); ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, "node_modules");
    if (fs.existsSync(path.join(candidate, "solc", "package.json"))) return candidate;
    if (path.dirname(dir) === dir) return null;
  }
}

const args = parseArgs(process.argv.slice(2));
const nodeModules = path.resolve(args.nodeModules ?? findNodeModules(process.cwd()) ?? findNodeModules(here) ?? "");
if (!fs.existsSync(path.join(nodeModules, "solc", "package.json"))) {
  throw new Error("node_modules with solc not found; pass --node-modules DIR");
}
const solc = createRequire(path.join(nodeModules, "..", "package.json"))(path.join(nodeModules, "solc"));

const sources = {};
for (const dir of args.sources.length ? args.sources : [here]) {
  for (const name of fs.readdirSync(dir).filter((f) => f.endsWith(".sol")).sort()) {
    if (name in sources) throw new Error(`two sources named ${name}`);
    sources[name] = { content: fs.readFileSync(path.join(dir, name), "utf8") };
  }
}

function findImports(importPath) {
  const resolved = path.join(nodeModules, importPath);
  if (!resolved.startsWith(nodeModules + path.sep) || !fs.existsSync(resolved)) {
    return { error: `import not found: ${importPath}` };
  }
  return { contents: fs.readFileSync(resolved, "utf8") };
}

const input = {
  language: "Solidity",
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    metadata: { bytecodeHash: "none", appendCBOR: false },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (output.errors ?? []).filter((e) => e.severity === "error");
for (const e of output.errors ?? []) process.stderr.write(`${e.formattedMessage}\n`);
if (errors.length) process.exit(1);

const result = {};
for (const file of Object.keys(sources)) {
  for (const [name, c] of Object.entries(output.contracts[file] ?? {})) {
    result[name] = {
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    };
  }
}
const text = JSON.stringify(result);
if (args.out) fs.writeFileSync(args.out, text);
else process.stdout.write(text + "\n");
