// klt-ckpt: look into a checkpoint without a model: what it holds and whether it is whole.
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"
#include "train/checkpoint.h"

static const char *usage =
    "usage: klt-ckpt COMMAND PATH\n"
    "\n"
    "PATH is a checkpoint directory (<run_dir>/ckpt/step_NNNNNNNN) or a run directory (its newest\n"
    "complete checkpoint is used).\n"
    "\n"
    "Commands:\n"
    "  inspect  print step, tokens, loader state, rank files and every tensor with its shape, then\n"
    "           whether the checkpoint is consistent (manifest, files, sizes, every tensor whole)\n"
    "  verify   check the consistency and every file's and dataset's CRC-32\n"
    "\n"
    "Exit code: 0 when the checkpoint is consistent (and, for verify, every checksum matches), 2 when not.\n";

// A run directory stands for its newest committed checkpoint.
static void resolve_path(const char *path, char *out, size_t cap) {
  char ckpt_dir[4096];
  struct stat info;
  snprintf(ckpt_dir, sizeof ckpt_dir, "%s/ckpt", path);
  if (stat(ckpt_dir, &info) == 0 && S_ISDIR(info.st_mode)) {
    if (!checkpoint_find_latest(path, out, cap))
      klt_user_error("run directory %s has no complete checkpoint yet", path);
    return;
  }
  snprintf(out, cap, "%s", path);
}

int main(int argc, char **argv) {
  if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
    fputs(usage, stdout);
    return 0;
  }
  if (argc != 3 || (strcmp(argv[1], "inspect") != 0 && strcmp(argv[1], "verify") != 0)) {
    fputs(usage, stderr);
    return KLT_EXIT_USER_ERROR;
  }
  bool verify = strcmp(argv[1], "verify") == 0;
  char path[4096], problem[1024];
  resolve_path(argv[2], path, sizeof path);
  bool ok = checkpoint_check(path, verify, verify ? NULL : stdout, problem, sizeof problem);
  if (!ok) {
    printf("%s: NOT consistent: %s\n", path, problem);
    return KLT_EXIT_USER_ERROR;
  }
  printf(verify ? "%s: consistent, every checksum matches\n" : "%s: consistent\n", path);
  return 0;
}
