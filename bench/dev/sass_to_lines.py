# Where a kernel's time or code goes, per source line of the kernel file. Builds a -lineinfo cubin of the file
# with kda_ab.sh's flags and reads its line table with nvdisasm -g. nvdisasm and cuobjdump are not in every
# toolkit install: pip download --no-deps nvidia-cuda-nvdisasm, unzip, and put its bin/ on PATH.
# Usage:
#   python3 bench/dev/sass_to_lines.py SASS.csv KERNEL_FILE.cu MANGLED_NAME_PREFIX [N]
#     stall samples of an ncu SASS export (kda_ab.sh PROFILE=X: sass_X_<kernel>.csv) summed per line, the CSV's
#     instructions mapped by offset (the instruction counts must match: same file, same flags); e.g.
#     ... sass_D0_wy_backward.csv .deps/kda_chunk_D0.cu _Z22kda_wy_backward_kernelILi128ELi128E 25
#   python3 bench/dev/sass_to_lines.py --static KERNEL_FILE.cu MANGLED_NAME_PREFIX [N]
#     static instruction counts per line with the most frequent opcodes (no GPU needed; a line inside a loop
#     that is not unrolled counts once).
import csv, os, re, shutil, subprocess, sys, tempfile


def kernel_instructions(src_path, prefix):
    """(offset, source line, opcode) of each SASS instruction of the kernel whose name starts with prefix."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join("kernels", "_sass_to_lines_tmp.cu")  # inside the tree, for its #include paths
        shutil.copy(src_path, src)
        try:
            subprocess.run(["nvcc", "-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr",
                            "-DKLT_HAVE_CUDA=1", "-I.", "-lineinfo", "-cubin", "-o", f"{tmp}/k.cubin", src],
                           check=True)
        finally:
            os.remove(src)
        sass = subprocess.run(["nvdisasm", "-g", "-c", f"{tmp}/k.cubin"], capture_output=True, text=True).stdout
    lines = sass.split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith(".text." + prefix))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("//----")), len(lines))
    out, cur = [], None
    for l in lines[start:end]:
        m = re.search(r'//## File "(.*?)", line (\d+)', l)
        if m:  # a line of the kernel file, or (an inlined header's) "header:line"
            f = m.group(1)
            cur = int(m.group(2)) if f.endswith("_sass_to_lines_tmp.cu") else f"{os.path.basename(f)}:{m.group(2)}"
            continue
        m = re.search(r"/\*([0-9a-f]{4,6})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", l)
        if m:
            out.append((int(m.group(1), 16), cur, m.group(3).split(".")[0]))
    return out


if sys.argv[1] == "--static":
    src_path, prefix = sys.argv[2:4]
    top = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    count, ops = {}, {}
    for _, ln, op in kernel_instructions(src_path, prefix):
        count[ln] = count.get(ln, 0) + 1
        ops.setdefault(ln, {})
        ops[ln][op] = ops[ln].get(op, 0) + 1
    print(f"{prefix}: {sum(count.values())} instructions")
    for ln in sorted(count, key=lambda k: -count[k])[:top]:
        mix = ", ".join(f"{o} {n}" for o, n in sorted(ops[ln].items(), key=lambda x: -x[1])[:6])
        print(f"  line {ln}: {count[ln]}  ({mix})")  # (a header's line: file:line)
    sys.exit()
csv_path, src_path, prefix = sys.argv[1:4]
top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
line_of = {off: ln for off, ln, _ in kernel_instructions(src_path, prefix)}
rows = list(csv.reader(open(csv_path, errors="replace")))
hi = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
hdr, data = rows[hi], [r for r in rows[hi + 1:] if len(r) > 3 and r[0].startswith("0x")]
if len(data) != len(line_of):
    sys.exit(f"{len(data)} instructions in the CSV, {len(line_of)} in the cubin: not the same build")
col = hdr.index("Warp Stall Sampling (All Samples)")
base, per_line = int(data[0][0], 16), {}
for r in data:
    ln = line_of[int(r[0], 16) - base]
    per_line[ln] = per_line.get(ln, 0.0) + float(r[col].replace(",", "") or 0)
total = sum(per_line.values())
text = open(src_path).read().split("\n")
for ln, v in sorted(per_line.items(), key=lambda x: -x[1])[:top]:
    print(f"{100 * v / total:5.1f}%  line {ln}: {text[ln - 1].strip()[:110] if isinstance(ln, int) else ''}")
