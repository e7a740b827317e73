# Static SASS instruction counts of one kernel per source line (no GPU needed): what each line of
# kernels/kda_chunk.cu (or a candidate file) compiles to, with the most frequent opcodes. Static, not dynamic:
# a line inside a loop that is not unrolled counts once. nvdisasm: pip download --no-deps nvidia-cuda-nvdisasm,
# unzip, put its bin/ on PATH (as for sass_to_lines.py).
# Usage: python3 bench/dev/sass_static_counts.py KERNEL_FILE.cu MANGLED_NAME_PREFIX [N]
#   e.g. ... kernels/kda_chunk.cu _Z28kda_pairwise_backward_kernelILi128E 20
import os, re, shutil, subprocess, sys, tempfile

src_path, prefix = sys.argv[1:3]
top = int(sys.argv[3]) if len(sys.argv) > 3 else 20
with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join("kernels", "_sass_static_tmp.cu")  # inside the tree, for its #include paths
    shutil.copy(src_path, src)
    try:
        subprocess.run(["nvcc", "-O3", "-DNDEBUG", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr",
                        "-DKLT_HAVE_CUDA=1", "-I.", "-lineinfo", "-cubin", "-o", f"{tmp}/k.cubin", src], check=True)
    finally:
        os.remove(src)
    lines = subprocess.run(["nvdisasm", "-g", "-c", f"{tmp}/k.cubin"], capture_output=True, text=True,
                           check=True).stdout.split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith(".text." + prefix))
end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(".text.")), len(lines))
line, count, ops = None, {}, {}
for l in lines[start:end]:
    m = re.search(r'//## File ".*?", line (\d+)', l)
    if m:
        line = int(m.group(1))
        continue
    m = re.search(r"/\*[0-9a-f]{4,6}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", l)
    if m:
        count[line] = count.get(line, 0) + 1
        op = m.group(2).split(".")[0]
        ops.setdefault(line, {})
        ops[line][op] = ops[line].get(op, 0) + 1
print(f"{lines[start][6:-1]}: {sum(count.values())} instructions")
for k in sorted(count, key=lambda k: -count[k])[:top]:
    mix = ", ".join(f"{o} {n}" for o, n in sorted(ops[k].items(), key=lambda x: -x[1])[:6])
    print(f"  line {k}: {count[k]}  ({mix})")
