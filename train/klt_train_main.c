// klt-train: reads the configuration, then trains (or prints the merged configuration).
//   klt-train CONFIG.ini [--set section.key=value ...] [--print-config]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"
#include "train/config.h"
#include "train/model_config.h"
#include "train/trainer.h"

static void usage(FILE *out) {
  fprintf(out,
          "usage: klt-train CONFIG.ini [--set section.key=value ...] [--print-config] [--resume [PATH]]\n"
          "  --set section.key=value   override one configuration key (repeatable)\n"
          "  --print-config            print the merged configuration and the parameter count, then exit\n"
          "  --resume [PATH]           continue from the latest checkpoint of [train] run_dir, or from PATH\n"
          "Every key is documented in configs/README.md.\n");
}

int main(int argc, char **argv) {
  const char *config_path = NULL;
  bool print_config = false;
  TrainOptions options = {0};
  Config config;
  config_set_defaults(&config);
  // Overrides apply after the file, whatever their position on the command line.
  const char **overrides = klt_calloc((size_t)argc, sizeof(char *));
  int override_count = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (strcmp(argv[i], "--print-config") == 0) {
      print_config = true;
    } else if (strcmp(argv[i], "--resume") == 0) {
      options.resume = true;
      struct stat st;  // an optional directory argument names the checkpoint
      if (i + 1 < argc && argv[i + 1][0] != '-' && stat(argv[i + 1], &st) == 0 && S_ISDIR(st.st_mode))
        options.resume_path = argv[++i];
    } else if (strncmp(argv[i], "--resume=", 9) == 0) {
      options.resume = true;
      options.resume_path = argv[i] + 9;
    } else if (strcmp(argv[i], "--set") == 0) {
      if (i + 1 >= argc) klt_user_error("--set needs an argument: --set section.key=value");
      overrides[override_count++] = argv[++i];
    } else if (strncmp(argv[i], "--set=", 6) == 0) {
      overrides[override_count++] = argv[i] + 6;
    } else if (argv[i][0] == '-') {
      usage(stderr);
      klt_user_error("unknown option '%s'", argv[i]);
    } else if (config_path) {
      usage(stderr);
      klt_user_error("more than one config file given ('%s' and '%s')", config_path, argv[i]);
    } else {
      config_path = argv[i];
    }
  }
  if (!config_path) {
    usage(stderr);
    klt_user_error("no config file given; try configs/default.ini");
  }
  config_load_file(&config, config_path);
  for (int i = 0; i < override_count; i++) config_set_override(&config, overrides[i]);
  free(overrides);
  ModelConfig model;
  model_config_from(&model, &config);

  if (print_config) {
    ParamCount count = model_count_params(&model);
    printf("; merged configuration of %s\n", config_path);
    printf("; parameters: %.4gB total, %.4gB active per token, %.4gB without the input embedding (%.0f total)\n",
           count.total / 1e9, count.active / 1e9, (count.active - count.embedding) / 1e9, count.total);
    printf("; training FLOPs per token at seq_len %d: %.4g\n", config.stage.seq_len,
           model_flops_per_token(&model, config.stage.seq_len));
    config_print(&config, stdout);
    return 0;
  }
  return train_run(&config, &model, &options);
}
