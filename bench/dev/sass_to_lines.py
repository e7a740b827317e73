# Stall samples of an ncu SASS export (kda_ab.sh PROFILE=X: sass_X_<kernel>.csv) summed per source line.
# Builds a -lineinfo cubin of the kernel file with kda_ab.sh's flags, reads its line table with nvdisasm -g and
# maps the CSV's instructions by offset (the instruction counts must match: same file, same flags).
# nvdisasm and cuobjdump are not in every toolkit install: pip download --no-deps nvidia-cuda-nvdisasm, unzip,
# and put its bin/ on PATH.
# Usage: python3 bench/dev/sass_to_lines.py SASS.csv KERNEL_FILE.cu MANGLED_NAME_PREFIX [N]
#   e.g. ... sass_D0_wy_backward.csv .deps/kda_chunk_D0.cu _Z22kda_wy_backward_kernelILi128ELi128E 25
import csv, os, re, shutil, subprocess, sys, tempfile

csv_path, src_path, prefix = sys.argv[1:4]
top = int(sys.argv[4]) if len(sys.argv) > 4 else 25
with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join("kernels", "_sass_to_lines_tmp.cu")  # inside the tree, for its #include paths
    shutil.copy(src_path, src)
    try:
        subprocess.run(["nvcc", "-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr",
                        "-DKLT_HAVE_CUDA=1", "-I.", "-lineinfo", "-cubin", "-o", f"{tmp}/k.cubin", src], check=True)
    finally:
        os.remove(src)
    sass = subprocess.run(["nvdisasm", "-g", "-c", f"{tmp}/k.cubin"], capture_output=True, text=True).stdout
lines = sass.split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith(".text." + prefix))
end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("//----")), len(lines))
line_of, cur = {}, None
for l in lines[start:end]:
    m = re.search(r'//## File ".*?", line (\d+)', l)
    if m:
        cur = int(m.group(1))
        continue
    m = re.search(r"/\*([0-9a-f]{4,6})\*/\s", l)
    if m:
        line_of[int(m.group(1), 16)] = cur
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
    print(f"{100 * v / total:5.1f}%  line {ln}: {text[ln - 1].strip()[:110] if ln else '?'}")
