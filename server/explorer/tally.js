// tally explorer: shared helpers. Plain JavaScript, no build step. Every proof is checked here,
// in the browser, with WebCrypto (SHA-256, Ed25519); the server is trusted for nothing.
"use strict";

const tally = {};

tally.hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

tally.unhex = (text) => {
  if (!/^([0-9a-f]{2})*$/.test(text)) throw new Error("not lowercase hex");
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(2 * i, 2), 16);
  return out;
};

tally.concat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
};

tally.sha256 = async (...parts) =>
  new Uint8Array(await crypto.subtle.digest("SHA-256", tally.concat(...parts)));

tally.equal = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

tally.ed25519 = async (publicKey, signature, message) => {
  const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  return crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
};

tally.u32 = (b, at) => new DataView(b.buffer, b.byteOffset + at, 4).getUint32(0, true);
tally.u64 = (b, at) => new DataView(b.buffer, b.byteOffset + at, 8).getBigUint64(0, true);

// RFC 9162 §2.1.3.2: the root an inclusion proof leads to.
tally.inclusionRoot = async (index, size, leaf, path) => {
  let fn = index, sn = size - 1, r = leaf;
  for (const p of path) {
    if (sn === 0) throw new Error("the proof is longer than the tree is deep");
    if (fn % 2 === 1 || fn === sn) {
      r = await tally.sha256(Uint8Array.of(1), p, r);
      while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else {
      r = await tally.sha256(Uint8Array.of(1), r, p);
    }
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new Error("the proof is shorter than the tree is deep");
  return r;
};

// A key schedule (PROTOCOL.md §4.14): the genesis key and, in height order, each rotation's
// height (BigInt) and new key. The key for a height is the newest rotated below it.
tally.schedule = (genesis) => ({ genesis, rotations: [] });

tally.keyFor = (keys, height) => {
  let key = keys.genesis;
  for (const r of keys.rotations) if (r.height < BigInt(height)) key = r.key;
  return key;
};

// The keys that may sign a checkpoint of `size`: the key for `size + 1` and every later one.
tally.checkpointKeys = (keys, size) => [tally.keyFor(keys, BigInt(size) + 1n),
  ...keys.rotations.filter((r) => r.height > BigInt(size)).map((r) => r.key)];

// One KeyLink (§4.14: SignedHeader ‖ new key ‖ previous u64 ‖ number u32 ‖ receipt ‖
// InclusionProof) as the next rotation of `keys`: null (and the rotation added), or what is wrong.
tally.linkFault = async (keys, link) => {
  if (link.length < 389 || link.length !== 389 + 32 * link[388]) return "not one link";
  const signed = link.subarray(0, 256), header = signed.subarray(0, 192);
  const newKey = link.subarray(256, 288), receipt = link.subarray(300, 380);
  const last = keys.rotations[keys.rotations.length - 1];
  const previous = last ? last.height : 0n, number = keys.rotations.length + 1;
  const height = tally.u64(header, 56), current = last ? last.key : keys.genesis;
  if (tally.u64(link, 288) !== previous || tally.u32(link, 296) !== number || height <= previous)
    return "it is not rotation " + number + " after height " + previous;
  const fault = await tally.headerFault(signed, current);
  if (fault) return fault;
  const named = await tally.sha256(new TextEncoder().encode("tally/rotate/v1\0"), newKey, link.subarray(288, 300));
  if (!tally.equal(named, receipt.subarray(16, 48)) || tally.u64(receipt, 48) !== height
    || receipt[60] !== 9 || receipt[61] !== 0)
    return "the receipt does not name this rotation";
  if (tally.u32(receipt, 56) + 1 !== tally.u32(header, 80)) return "the rotation is not its batch's last leaf";
  const inclusion = await tally.inclusionFault(link.subarray(380), receipt, header);
  if (inclusion) return inclusion;
  const id = async (key) => tally.hex((await tally.sha256(key)).subarray(0, 8));
  if ((await id(newKey)) === (await id(current))) return "the rotation names the key that signs";
  keys.rotations.push({ height, key: newKey });
  return null;
};

// Follows `links` (hex) from the genesis key: the schedule, or throws what is wrong.
tally.followChain = async (genesis, links) => {
  const keys = tally.schedule(genesis);
  for (let i = 0; i < links.length; i++) {
    const fault = await tally.linkFault(keys, tally.unhex(links[i]));
    if (fault) throw new Error("key chain link " + i + " (rotation " + (i + 1) + "): " + fault);
  }
  return keys;
};

// The keys a file's headers are checked under (PROTOCOL.md §11): the file's `key_chain`
// followed from the trusted genesis key `operatorHex`, else `known` (links the page fetched)
// followed from it, else the genesis key alone. Without a trusted key: the file's own key
// alone (which proves only that the file is consistent; nothing names the chain's start).
tally.fileKeys = async (file, operatorHex, known) => {
  const start = tally.unhex(operatorHex || file.operator_public_key || "");
  if (start.length !== 32) throw new Error("the operator key is not 32 bytes");
  if (!operatorHex) return tally.schedule(start);
  const links = file.key_chain && file.key_chain.length ? file.key_chain : known || [];
  return tally.followChain(start, links);
};

// Checks a proof file (PROTOCOL.md §10, §11) under the genesis key `operatorHex` (empty: the
// file's own key) and the chain `known` (links, hex) for a file that carries none. Returns
// {valid, checks, reason, fields}; `checks` lists what passed, in order.
tally.verifyConfirmation = async (text, operatorHex, known) => {
  const checks = [];
  const fail = (reason) => ({ valid: false, checks, reason });
  let file, keys;
  try { file = JSON.parse(text); } catch (e) { return fail("not JSON: " + e.message); }
  try { keys = await tally.fileKeys(file, operatorHex, known); } catch (e) { return fail(e.message); }
  if (keys.rotations.length)
    checks.push("the key chain leads from the genesis key through " + keys.rotations.length + " rotation(s)");
  if (file.format === "tally-consistency-proof-v1") return tally.verifyConsistency(file, keys, checks);
  if (file.format === "tally-balance-proof-v1") return tally.verifyBalance(text, keys, checks);
  if (file.format === "tally-operation-confirmation-v1") return tally.verifyOperation(file, keys, checks);
  if (file.format === "tally-expiry-confirmation-v1") return tally.verifyExpiry(file, keys, checks);
  if (file.format === "tally-envelope-confirmation-v1") return tally.verifyEnvelope(file, keys, checks);
  if (file.format !== "tally-confirmation-v1") return fail("format " + JSON.stringify(file.format) + " is not tally-confirmation-v1");
  return tally.verifyRequest(file, keys, checks);
};

// Checks a `tally-confirmation-v1` file (PROTOCOL.md §10) under `keys`.
tally.verifyRequest = async (file, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  let bytes;
  try { bytes = tally.unhex(file.confirmation_hex); } catch (e) { return fail(e.message); }
  if (bytes.length < 554 || (bytes.length - 554) % 32 !== 0 || bytes[0] !== 0) return fail("confirmation_hex is not one confirmation");
  const request = bytes.subarray(1, 209), receipt = bytes.subarray(209, 289);
  const signed = bytes.subarray(289, 545), proof = bytes.subarray(545);
  const header = signed.subarray(0, 192);
  const operator = tally.keyFor(keys, tally.u64(header, 56));
  checks.push("the bytes have the layout of a confirmation");
  if (!(await tally.ed25519(request.subarray(72, 104), request.subarray(144, 208), request.subarray(0, 144))))
    return fail("the request's signature does not verify");
  checks.push("the request's signature verifies under its signer");
  if (!tally.equal(await tally.sha256(request), receipt.subarray(16, 48)))
    return fail("the receipt names another request");
  if (receipt[60] !== request[48]) return fail("the receipt's operation is not the request's");
  if (tally.u64(receipt, 48) !== tally.u64(header, 56)) return fail("the receipt is of another height");
  checks.push("the receipt names the request, its operation and the header's height");
  const index = tally.u32(proof, 0), size = tally.u32(proof, 4), count = proof[8];
  if (proof.length !== 9 + 32 * count || index !== tally.u32(receipt, 56) || size !== tally.u32(header, 80))
    return fail("the proof's position does not match the receipt and the header");
  const path = [];
  for (let i = 0; i < count; i++) path.push(proof.subarray(9 + 32 * i, 41 + 32 * i));
  let root;
  try { root = await tally.inclusionRoot(index, size, await tally.sha256(Uint8Array.of(0), receipt), path); }
  catch (e) { return fail(e.message); }
  if (!tally.equal(root, header.subarray(120, 152)))
    return fail("the inclusion proof does not lead to the header's Merkle root");
  checks.push("the inclusion proof leads from the receipt to the header's Merkle root");
  if (!tally.equal((await tally.sha256(operator)).subarray(0, 8), header.subarray(184, 192)))
    return fail("the header names another operator key");
  if (!(await tally.ed25519(operator, signed.subarray(192, 256), header)))
    return fail("the operator's signature over the header does not verify");
  checks.push("the operator's signature over the header verifies");
  return {
    valid: true, checks,
    fields: {
      height: tally.u64(header, 56).toString(), index,
      amount: tally.u64(request, 136).toString(),
      signer: tally.hex(request.subarray(72, 104)), to: tally.hex(request.subarray(104, 136)),
    },
  };
};

// The operator's key id and signature over a 256-byte SignedHeader: null, or what is wrong.
tally.headerFault = async (signed, operator) => {
  if (operator.length !== 32) return "the operator key is not 32 bytes";
  const header = signed.subarray(0, 192);
  if (!tally.equal((await tally.sha256(operator)).subarray(0, 8), header.subarray(184, 192)))
    return "the header names another operator key";
  if (!(await tally.ed25519(operator, signed.subarray(192, 256), header)))
    return "the operator's signature over the header does not verify";
  return null;
};

// An InclusionProof (§4.5) of `receipt` under `header`: null, or what is wrong.
tally.inclusionFault = async (proof, receipt, header) => {
  const index = tally.u32(proof, 0), size = tally.u32(proof, 4), count = proof[8];
  if (proof.length !== 9 + 32 * count || index !== tally.u32(receipt, 56) || size !== tally.u32(header, 80))
    return "the proof's position does not match the receipt and the header";
  const path = [];
  for (let i = 0; i < count; i++) path.push(proof.subarray(9 + 32 * i, 41 + 32 * i));
  const root = await tally.inclusionRoot(index, size, await tally.sha256(Uint8Array.of(0), receipt), path);
  if (!tally.equal(root, header.subarray(120, 152)))
    return "the inclusion proof does not lead to the header's Merkle root";
  return null;
};

// What every one-leaf proof ends with: the receipt's inclusion under the header's Merkle root
// and the operator's signature over the header; the result shows `amount`.
tally.leafAndHeader = async (checks, receipt, signed, proof, operator, amount) => {
  const header = signed.subarray(0, 192);
  const inclusion = await tally.inclusionFault(proof, receipt, header);
  if (inclusion) return { valid: false, checks, reason: inclusion };
  checks.push("the inclusion proof leads from the receipt to the header's Merkle root");
  const fault = await tally.headerFault(signed, operator);
  if (fault) return { valid: false, checks, reason: fault };
  checks.push("the operator's signature over the header verifies");
  const fields = { height: tally.u64(header, 56).toString(), index: tally.u32(receipt, 56), amount };
  return { valid: true, checks, fields };
};

// An Envelope (§4.7) at the start of `bytes`: {envelope, count} after its signature checks, or
// throws what is wrong.
tally.envelope = async (bytes) => {
  if (bytes.length < 88 + 120 + 64 || (bytes.length - 152) % 120 !== 0) throw new Error("not an envelope");
  const count = tally.u32(bytes, 84);
  if (bytes.length !== 152 + 120 * count) throw new Error("the envelope's count does not match its bytes");
  const n = bytes.length;
  if (!(await tally.ed25519(bytes.subarray(48, 80), bytes.subarray(n - 64), bytes.subarray(0, n - 64))))
    throw new Error("the envelope's signature does not verify");
  return { envelope: bytes, count, atomic: (bytes[80] & 1) === 1 };
};

// Checks a `tally-operation-confirmation-v1` file (PROTOCOL.md §4.9).
tally.verifyOperation = async (file, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  try {
    const bytes = tally.unhex(file.confirmation_hex);
    const length = tally.u32(bytes, 0);
    if (bytes.length < 4 + length + 80 + 256 + 9) return fail("confirmation_hex is not one operation's confirmation");
    const { envelope, count, atomic } = await tally.envelope(bytes.subarray(4, 4 + length));
    checks.push("the envelope's signature verifies under its signer");
    const rest = bytes.subarray(4 + length);
    const receipt = rest.subarray(0, 80), signed = rest.subarray(80, 336), header = signed.subarray(0, 192);
    if (!tally.equal(envelope.subarray(16, 48), header.subarray(24, 56)))
      return fail("the envelope and the header belong to different chains");
    if (!tally.equal(await tally.sha256(envelope), receipt.subarray(16, 48)))
      return fail("the receipt is for a different envelope");
    const opIndex = receipt[62] | (receipt[63] << 8);
    if (opIndex >= count || receipt[60] !== envelope[88 + 120 * opIndex]
      || tally.u64(receipt, 48) !== tally.u64(header, 56) || (atomic && receipt[61] !== 0))
      return fail("the receipt does not describe the envelope's operation at this height");
    checks.push("the receipt names the envelope, operation " + opIndex + " and the header's height");
    const amount = tally.u64(envelope, 88 + 120 * opIndex + 56).toString();
    const operator = tally.keyFor(keys, tally.u64(header, 56));
    return tally.leafAndHeader(checks, receipt, signed, rest.subarray(336), operator, amount);
  } catch (e) {
    return fail(e.message);
  }
};

// Checks a `tally-expiry-confirmation-v1` file (PROTOCOL.md §4.11).
tally.verifyExpiry = async (file, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  try {
    const bytes = tally.unhex(file.confirmation_hex);
    if (bytes.length < 48 + 80 + 256 + 9) return fail("confirmation_hex is not an expiry's confirmation");
    const owner = bytes.subarray(0, 32), id = bytes.subarray(32, 48), receipt = bytes.subarray(48, 128);
    const signed = bytes.subarray(128, 384), header = signed.subarray(0, 192);
    const named = await tally.sha256(new TextEncoder().encode("tally/expire/v1\0"), owner, id);
    if (!tally.equal(named, receipt.subarray(16, 48))) return fail("the receipt is not the expiry of this reserve");
    if (receipt[60] !== 8 || receipt[61] !== 0 || receipt[62] !== 0 || receipt[63] !== 0
      || tally.u64(receipt, 48) !== tally.u64(header, 56))
      return fail("the receipt does not describe an expiry at this height");
    checks.push("the receipt names the expiry of the reserve at the header's height");
    const amount = tally.u64(receipt, 64).toString();
    const operator = tally.keyFor(keys, tally.u64(header, 56));
    return tally.leafAndHeader(checks, receipt, signed, bytes.subarray(384), operator, amount);
  } catch (e) {
    return fail(e.message);
  }
};

// RFC 6962 §2.1: the split of n > 1 leaves, the largest power of two below n.
tally.split = (n) => { let k = 1; while (k * 2 < n) k *= 2; return k; };

// The RFC 6962 root of `leaves` (leaf hashes).
tally.treeHash = async (leaves) => {
  if (leaves.length === 1) return leaves[0];
  const k = tally.split(leaves.length);
  return tally.sha256(Uint8Array.of(1), await tally.treeHash(leaves.slice(0, k)), await tally.treeHash(leaves.slice(k)));
};

// The root a RangeProof (§4.8) gives for `leaves` at `first` of a tree of `size`, walking the
// tree's recursion; `hashes` is consumed in order. Null if the proof runs short.
tally.rangeRoot = async (lo, hi, a, b, leaves, hashes) => {
  if (b <= lo || hi <= a) return hashes.length ? hashes.shift() : null;
  if (a <= lo && hi <= b) return tally.treeHash(leaves.slice(lo - a, hi - a));
  const k = tally.split(hi - lo);
  const left = await tally.rangeRoot(lo, lo + k, a, b, leaves, hashes);
  const right = left && await tally.rangeRoot(lo + k, hi, a, b, leaves, hashes);
  return right && tally.sha256(Uint8Array.of(1), left, right);
};

// Checks a `tally-envelope-confirmation-v1` file (PROTOCOL.md §4.8).
tally.verifyEnvelope = async (file, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  try {
    const { envelope, count, atomic } = await tally.envelope(tally.unhex(file.envelope_hex));
    checks.push("the envelope's signature verifies under its signer");
    const c = tally.unhex(file.confirmation_hex);
    const signed = c.subarray(33, 289), header = signed.subarray(0, 192);
    const hash = await tally.sha256(envelope);
    if (!tally.equal(hash, c.subarray(1, 33))) return fail("the confirmation is for a different envelope");
    if (!tally.equal(envelope.subarray(16, 48), header.subarray(24, 56)))
      return fail("the envelope and the header belong to different chains");
    if (tally.u32(c, 289) !== count || c.length < 293 + 80 * count + 13)
      return fail("the confirmation does not hold one receipt per operation");
    const p = c.subarray(293 + 80 * count);
    const first = tally.u32(p, 0), size = tally.u32(p, 8), k = p[12];
    if (tally.u32(p, 4) !== count || size !== tally.u32(header, 80) || p.length !== 13 + 32 * k
      || first + count > size)
      return fail("the range proof's position does not match the receipts and the header");
    const leaves = [];
    for (let i = 0; i < count; i++) {
      const r = c.subarray(293 + 80 * i, 373 + 80 * i);
      if (!tally.equal(r.subarray(16, 48), hash) || (r[62] | (r[63] << 8)) !== i || r[60] !== envelope[88 + 120 * i]
        || tally.u32(r, 56) !== first + i || tally.u64(r, 48) !== tally.u64(header, 56) || (atomic && r[61] !== 0))
        return fail("receipt " + i + " does not describe operation " + i + " at leaf " + (first + i) + " of this height");
      leaves.push(await tally.sha256(Uint8Array.of(0), r));
    }
    checks.push("receipt i describes operation i at leaf first + i, at the header's height");
    const hashes = [];
    for (let i = 0; i < k; i++) hashes.push(p.subarray(13 + 32 * i, 45 + 32 * i));
    const root = await tally.rangeRoot(0, size, first, first + count, leaves, hashes);
    if (!root || hashes.length || !tally.equal(root, header.subarray(120, 152)))
      return fail("the range proof does not lead to the header's Merkle root");
    checks.push("the range proof leads from the receipts to the header's Merkle root");
    const fault = await tally.headerFault(signed, tally.keyFor(keys, tally.u64(header, 56)));
    if (fault) return fail(fault);
    checks.push("the operator's signature over the header verifies");
    return { valid: true, checks, fields: { height: tally.u64(header, 56).toString(), index: first,
      amount: count + " operations" } };
  } catch (e) {
    return fail(e.message);
  }
};

// RFC 9162 §2.1.4.2: whether `proof` shows the tree (m, oldRoot) is a prefix of (n, newRoot).
tally.consistent = async (m, n, oldRoot, newRoot, proof) => {
  if (m === n) return proof.length === 0 && tally.equal(oldRoot, newRoot);
  if (m === 0 || proof.length === 0) return false;
  const path = (m & (m - 1)) === 0 ? [oldRoot, ...proof] : proof;
  let fn = m - 1, sn = n - 1;
  while (fn % 2 === 1) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
  let fr = path[0], sr = path[0];
  for (const c of path.slice(1)) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      fr = await tally.sha256(Uint8Array.of(1), c, fr);
      sr = await tally.sha256(Uint8Array.of(1), c, sr);
      while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else {
      sr = await tally.sha256(Uint8Array.of(1), sr, c);
    }
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  return sn === 0 && tally.equal(fr, oldRoot) && tally.equal(sr, newRoot);
};

tally.b64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

// Opens a checkpoint note signed by the first of `keys` that signed it: {size, root} or throws.
tally.openCheckpointUnder = async (note, origin, keys) => {
  let last = new Error("no operator key to open a checkpoint under");
  for (const key of keys) {
    try { return await tally.openCheckpoint(note, origin, key); } catch (e) { last = e; }
  }
  throw last;
};

// Opens a checkpoint note signed by `operator` under key name `origin`: {size, root} or throws.
tally.openCheckpoint = async (note, origin, operator) => {
  const split = note.lastIndexOf("\n\n");
  if (split < 0) throw new Error("a checkpoint without signatures");
  const text = note.slice(0, split + 1), lines = note.slice(split + 2).split("\n").filter((l) => l);
  const keyId = (await tally.sha256(new TextEncoder().encode(origin + "\n"), Uint8Array.of(1), operator)).subarray(0, 4);
  let signed = false;
  for (const line of lines) {
    const [dash, name, blob] = line.split(" ");
    if (dash !== "\u2014" || name !== origin) continue;
    const raw = tally.b64(blob);
    if (!tally.equal(raw.subarray(0, 4), keyId)) continue;
    if (!(await tally.ed25519(operator, raw.subarray(4), new TextEncoder().encode(text))))
      throw new Error("a checkpoint signature does not verify");
    signed = true;
  }
  if (!signed) throw new Error("a checkpoint is not signed by the operator key");
  const [o, size, root] = text.split("\n");
  if (o !== origin) throw new Error("a checkpoint of another log");
  return { size: Number(size), root: tally.b64(root) };
};

// Checks a `tally-consistency-proof-v1` file (PROTOCOL.md §11.1) under `keys`: each header
// under the key for its height, each checkpoint under a key at or after its size's.
tally.verifyConsistency = async (file, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  try {
    const roots = [];
    for (const end of ["from", "to"]) {
      const signed = tally.unhex(file[end + "_header_hex"]);
      if (signed.length !== 256) return fail("a header is not 256 bytes");
      const header = signed.subarray(0, 192), at = tally.u64(header, 56);
      const fault = await tally.headerFault(signed, tally.keyFor(keys, at));
      if (fault) return fail(fault + " (the header at " + end + ")");
      const origin = "tally.ledger/" + tally.hex(header.subarray(24, 56));
      const cp = await tally.openCheckpointUnder(file[end + "_checkpoint"], origin, tally.checkpointKeys(keys, at));
      const height = Number(at);
      if (cp.size !== height || cp.size !== file[end + "_size"] || tally.hex(cp.root) !== file[end + "_root"])
        return fail("the " + end + " sizes or roots disagree with the signed checkpoint");
      const path = file[end + "_inclusion"].map(tally.unhex);
      const root = await tally.inclusionRoot(height - 1, height, await tally.sha256(Uint8Array.of(0), signed), path);
      if (!tally.equal(root, cp.root)) return fail("the header at " + height + " is not its checkpoint's last leaf");
      roots.push(cp);
    }
    checks.push("both headers and both checkpoints are signed by the operator key");
    checks.push("each header is the last leaf of its checkpoint's log");
    const ok = await tally.consistent(roots[0].size, roots[1].size, roots[0].root, roots[1].root, file.proof.map(tally.unhex));
    if (!ok) return fail("the consistency proof does not lead from one root to the other");
    checks.push("the log of size " + roots[0].size + " is a prefix of the log of size " + roots[1].size);
    return { valid: true, checks, fields: { height: roots[1].size, from: roots[0].size } };
  } catch (e) {
    return fail(e.message);
  }
};

// The numbers of a JSON text as BigInts, exactly (u64 and u128 figures exceed 2^53): from
// the source text where the browser gives it to a reviver, else from the parsed number.
tally.parseExact = (text) =>
  JSON.parse(text, (key, value, context) =>
    typeof value === "number" ? BigInt(context && context.source ? context.source : value) : value);

tally.le = (n, bytes) => {
  const out = new Uint8Array(bytes);
  let v = BigInt(n);
  for (let i = 0; i < bytes; i++) { out[i] = Number(v & 255n); v >>= 8n; }
  return out;
};

// Bit `depth` of a 32-byte path, most significant first.
tally.bit = (path, depth) => (path[depth >> 3] >> (7 - (depth & 7))) & 1;

// Checks a `tally-balance-proof-v1` file (PROTOCOL.md §4.13, §11.3) under `keys`.
tally.verifyBalance = async (text, keys, checks) => {
  const fail = (reason) => ({ valid: false, checks, reason });
  try {
    const file = tally.parseExact(text);
    const signed = tally.unhex(file.header_hex);
    if (signed.length !== 256) return fail("the header is not 256 bytes");
    const header = signed.subarray(0, 192);
    if (header[16] !== 2) return fail("not a version 2 header");
    const fault = await tally.headerFault(signed, tally.keyFor(keys, tally.u64(header, 56)));
    if (fault) return fail(fault);
    checks.push("the operator's signature over the header verifies");
    const height = tally.u64(header, 56), root = tally.unhex(file.map_root);
    if (height !== file.height) return fail("the file's height is not the header's");
    const digest = await tally.sha256(new TextEncoder().encode("tally/state/v2\0\0"), root,
      tally.le(file.account_count, 8), tally.le(file.total_deposited, 16),
      tally.le(file.total_withdrawn, 16), tally.le(height, 8));
    if (!tally.equal(digest, header.subarray(152, 184)))
      return fail("the summary does not give the header's state digest");
    checks.push("the map root and totals give the header's state digest");
    const account = tally.unhex(file.account);
    const path = await tally.sha256(new TextEncoder().encode("tally/map/acct\0\0"), account);
    if (account.length !== 32 || tally.hex(path) !== file.path) return fail("the file's path is not the account's");
    const siblings = file.siblings.map(tally.unhex), depth = siblings.length;
    let node;
    if (file.exists) {
      if (file.neighbor !== null) return fail("a present account has no neighbor");
      node = await tally.sha256(Uint8Array.of(0), path, await tally.sha256(tally.le(file.balance, 8)));
    } else if (file.balance !== 0n) {
      return fail("an absent account's balance is 0");
    } else if (file.neighbor === null) {
      node = new Uint8Array(32);
    } else {
      const other = tally.unhex(file.neighbor.path);
      let common = 0;
      while (common < 256 && tally.bit(other, common) === tally.bit(path, common)) common++;
      if (common === 256 || common < depth) return fail("the neighbor does not stand where the account's path leads");
      node = await tally.sha256(Uint8Array.of(0), other, tally.unhex(file.neighbor.value_hash));
    }
    for (let i = 0; i < depth; i++) {
      node = tally.bit(path, depth - 1 - i)
        ? await tally.sha256(Uint8Array.of(1), siblings[i], node)
        : await tally.sha256(Uint8Array.of(1), node, siblings[i]);
    }
    if (!tally.equal(node, root)) return fail("the proof does not lead to the state map root");
    checks.push(file.exists ? "the account's balance is in the state map" : "the account is not in the state map");
    return { valid: true, checks, fields: { height: height.toString(), balance: file.balance.toString(), exists: file.exists } };
  } catch (e) {
    return fail(e.message);
  }
};

// The text of an API answer (for a proof file, whose numbers must be read exactly).
tally.apiText = async (path) => {
  const answer = await fetch("/explorer/api/" + path);
  const text = await answer.text();
  if (!answer.ok) throw new Error(JSON.parse(text).error || answer.status);
  return text;
};

tally.api = async (path) => {
  const answer = await fetch("/explorer/api/" + path);
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.error || answer.status);
  return body;
};

tally.el = (tag, attrs, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
};

tally.table = (columns, rows) =>
  tally.el("table", {}, tally.el("tr", {}, ...columns.map((c) => tally.el("th", {}, c))),
    ...rows.map((r) => tally.el("tr", {}, ...r.map((cell) => tally.el("td", {}, cell)))));

tally.param = (name) => new URLSearchParams(location.search).get(name);
