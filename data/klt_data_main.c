// klt-data: prepare, synthesize and inspect token datasets (directories of HDF5 shards).
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "data/prep.h"

static const char *main_usage =
    "usage: klt-data COMMAND [OPTIONS]\n"
    "\n"
    "Commands:\n"
    "  prep     tokenize text (byte tokenizer) or pack pre-tokenized files into HDF5 shards\n"
    "  synth    write a synthetic recall task (mqar, palindrome) with a loss mask\n"
    "  inspect  verify every shard of a dataset directory and print a summary\n"
    "\n"
    "Run `klt-data COMMAND --help` for a command's options.\n";

static const char *prep_usage =
    "usage: klt-data prep --output DIR [OPTIONS] INPUT...\n"
    "\n"
    "  --output DIR            dataset directory to write (must be empty or new, see --force)\n"
    "  --format F              text (default; byte tokenizer, one file = one document), u16, u32\n"
    "                          (raw little-endian token arrays) or npy (1-D uint16/uint32/int32/int64)\n"
    "  --vocab-size V          vocabulary size of pre-tokenized input (required there; text: 257)\n"
    "  --tokenizer NAME        tokenizer name stored in the shards (text: only 'byte')\n"
    "  --eod ID                pre-tokenized: ID ends a document (default: one file = one document)\n"
    "  --split-on-blank-lines  text: blank lines separate documents inside a file\n"
    "  --shard-tokens N        tokens per shard at most (default 16777216)\n"
    "  --deflate L             deflate level 0-9 (default 0, no compression)\n"
    "  --force                 replace the shards of a non-empty output directory\n"
    "  --help                  show this help\n";

static const char *synth_usage =
    "usage: klt-data synth --task mqar|palindrome --output DIR --seq-len T --examples N [OPTIONS]\n"
    "\n"
    "Each example is one document of exactly T tokens; the loss mask is 1 only on answer tokens.\n"
    "Token layouts: data/README.md.\n"
    "  --task mqar|palindrome  multi-query associative recall, or copy-in-reverse\n"
    "  --output DIR            dataset directory to write\n"
    "  --seq-len T             tokens per example (use the same seq_len in training)\n"
    "  --examples N            number of examples\n"
    "  --seed S                random seed (default 1)\n"
    "  --vocab-size V          vocabulary size (default 8192)\n"
    "  --pairs P               mqar: key-value pairs per example (default T/4)\n"
    "  --queries Q             mqar: queries per example, at most P (default P)\n"
    "  --length L              palindrome: tokens before the separator (default (T-1)/2)\n"
    "  --shard-tokens N        tokens per shard at most, rounded to whole examples (default 16777216)\n"
    "  --deflate L             deflate level 0-9 (default 0)\n"
    "  --force                 replace the shards of a non-empty output directory\n"
    "  --help                  show this help\n";

static const char *inspect_usage =
    "usage: klt-data inspect DIR\n"
    "\n"
    "Verifies every shard of DIR (datasets, dtypes, attributes, token counts, document offsets, every\n"
    "token id below vocab_size, one vocabulary and tokenizer throughout) and prints a summary.\n";

static void usage_error(const char *usage, const char *fmt, const char *detail) {
  fprintf(stderr, "klt-data: ");
  fprintf(stderr, fmt, detail);
  fprintf(stderr, "\n\n%s", usage);
  exit(KLT_EXIT_USER_ERROR);
}

static uint64_t parse_count(const char *usage, const char *option, const char *text) {
  char *end = NULL;
  if (text[0] == '-') usage_error(usage, "%s needs a non-negative integer", option);
  unsigned long long value = strtoull(text, &end, 10);
  if (end == text || *end != 0) usage_error(usage, "%s needs a non-negative integer", option);
  return value;
}

static int parse_int(const char *usage, const char *option, const char *text) {
  uint64_t value = parse_count(usage, option, text);
  if (value > 0x7fffffff) usage_error(usage, "%s is too large", option);
  return (int)value;
}

static int command_prep(int argc, char **argv) {
  enum { OPTION_OUTPUT = 1, OPTION_FORMAT, OPTION_VOCAB, OPTION_TOKENIZER, OPTION_EOD, OPTION_SPLIT,
         OPTION_SHARD_TOKENS, OPTION_DEFLATE, OPTION_FORCE, OPTION_HELP };
  static const struct option options[] = {
      {"output", required_argument, NULL, OPTION_OUTPUT}, {"format", required_argument, NULL, OPTION_FORMAT},
      {"vocab-size", required_argument, NULL, OPTION_VOCAB},
      {"tokenizer", required_argument, NULL, OPTION_TOKENIZER}, {"eod", required_argument, NULL, OPTION_EOD},
      {"split-on-blank-lines", no_argument, NULL, OPTION_SPLIT},
      {"shard-tokens", required_argument, NULL, OPTION_SHARD_TOKENS},
      {"deflate", required_argument, NULL, OPTION_DEFLATE}, {"force", no_argument, NULL, OPTION_FORCE},
      {"help", no_argument, NULL, OPTION_HELP}, {NULL, 0, NULL, 0}};
  PrepConfig config = {.format = PREP_FORMAT_TEXT, .shard_tokens = 1 << 24, .end_of_document = -1,
                       .show_progress = 1};
  int option;
  opterr = 0;
  while ((option = getopt_long(argc, argv, "", options, NULL)) != -1) {
    switch (option) {
      case OPTION_OUTPUT: config.output = optarg; break;
      case OPTION_FORMAT:
        if (strcmp(optarg, "text") == 0) config.format = PREP_FORMAT_TEXT;
        else if (strcmp(optarg, "u16") == 0) config.format = PREP_FORMAT_U16;
        else if (strcmp(optarg, "u32") == 0) config.format = PREP_FORMAT_U32;
        else if (strcmp(optarg, "npy") == 0) config.format = PREP_FORMAT_NPY;
        else usage_error(prep_usage, "unknown --format '%s' (text, u16, u32 or npy)", optarg);
        break;
      case OPTION_VOCAB: config.vocab_size = parse_count(prep_usage, "--vocab-size", optarg); break;
      case OPTION_TOKENIZER: config.tokenizer = optarg; break;
      case OPTION_EOD: config.end_of_document = (int64_t)parse_count(prep_usage, "--eod", optarg); break;
      case OPTION_SPLIT: config.split_on_blank_lines = 1; break;
      case OPTION_SHARD_TOKENS: config.shard_tokens = parse_count(prep_usage, "--shard-tokens", optarg); break;
      case OPTION_DEFLATE: config.deflate_level = parse_int(prep_usage, "--deflate", optarg); break;
      case OPTION_FORCE: config.force = 1; break;
      case OPTION_HELP: fputs(prep_usage, stdout); return 0;
      default: usage_error(prep_usage, "unknown or incomplete option %s", argv[optind - 1]);
    }
  }
  if (!config.output) usage_error(prep_usage, "%s", "--output DIR is required");
  if (optind >= argc) usage_error(prep_usage, "%s", "no INPUT files given");
  config.inputs = (const char *const *)(argv + optind);
  config.input_count = argc - optind;
  double start = klt_now_seconds();
  PrepTotals totals = prep_write_dataset(&config);
  printf("wrote %llu tokens in %llu documents to %d shards in %s (%.1f s)\n", (unsigned long long)totals.tokens,
         (unsigned long long)totals.documents, totals.shards, config.output, klt_now_seconds() - start);
  return 0;
}

static int command_synth(int argc, char **argv) {
  enum { OPTION_TASK = 1, OPTION_OUTPUT, OPTION_SEQ_LEN, OPTION_EXAMPLES, OPTION_SEED, OPTION_VOCAB,
         OPTION_PAIRS, OPTION_QUERIES, OPTION_LENGTH, OPTION_SHARD_TOKENS, OPTION_DEFLATE, OPTION_FORCE,
         OPTION_HELP };
  static const struct option options[] = {
      {"task", required_argument, NULL, OPTION_TASK}, {"output", required_argument, NULL, OPTION_OUTPUT},
      {"seq-len", required_argument, NULL, OPTION_SEQ_LEN},
      {"examples", required_argument, NULL, OPTION_EXAMPLES}, {"seed", required_argument, NULL, OPTION_SEED},
      {"vocab-size", required_argument, NULL, OPTION_VOCAB}, {"pairs", required_argument, NULL, OPTION_PAIRS},
      {"queries", required_argument, NULL, OPTION_QUERIES}, {"length", required_argument, NULL, OPTION_LENGTH},
      {"shard-tokens", required_argument, NULL, OPTION_SHARD_TOKENS},
      {"deflate", required_argument, NULL, OPTION_DEFLATE}, {"force", no_argument, NULL, OPTION_FORCE},
      {"help", no_argument, NULL, OPTION_HELP}, {NULL, 0, NULL, 0}};
  SynthConfig config = {.seed = 1, .vocab_size = 8192, .shard_tokens = 1 << 24};
  int have_task = 0;
  int option;
  opterr = 0;
  while ((option = getopt_long(argc, argv, "", options, NULL)) != -1) {
    switch (option) {
      case OPTION_TASK:
        have_task = 1;
        if (strcmp(optarg, "mqar") == 0) config.task = SYNTH_TASK_MQAR;
        else if (strcmp(optarg, "palindrome") == 0) config.task = SYNTH_TASK_PALINDROME;
        else usage_error(synth_usage, "unknown --task '%s' (mqar or palindrome)", optarg);
        break;
      case OPTION_OUTPUT: config.output = optarg; break;
      case OPTION_SEQ_LEN: config.seq_len = parse_int(synth_usage, "--seq-len", optarg); break;
      case OPTION_EXAMPLES: config.examples = parse_count(synth_usage, "--examples", optarg); break;
      case OPTION_SEED: config.seed = parse_count(synth_usage, "--seed", optarg); break;
      case OPTION_VOCAB: config.vocab_size = parse_count(synth_usage, "--vocab-size", optarg); break;
      case OPTION_PAIRS: config.pairs = parse_int(synth_usage, "--pairs", optarg); break;
      case OPTION_QUERIES: config.queries = parse_int(synth_usage, "--queries", optarg); break;
      case OPTION_LENGTH: config.length = parse_int(synth_usage, "--length", optarg); break;
      case OPTION_SHARD_TOKENS: config.shard_tokens = parse_count(synth_usage, "--shard-tokens", optarg); break;
      case OPTION_DEFLATE: config.deflate_level = parse_int(synth_usage, "--deflate", optarg); break;
      case OPTION_FORCE: config.force = 1; break;
      case OPTION_HELP: fputs(synth_usage, stdout); return 0;
      default: usage_error(synth_usage, "unknown or incomplete option %s", argv[optind - 1]);
    }
  }
  if (!have_task) usage_error(synth_usage, "%s", "--task is required");
  if (!config.output) usage_error(synth_usage, "%s", "--output DIR is required");
  if (config.seq_len == 0) usage_error(synth_usage, "%s", "--seq-len T is required");
  if (config.examples == 0) usage_error(synth_usage, "%s", "--examples N is required");
  if (optind < argc) usage_error(synth_usage, "unexpected argument %s", argv[optind]);
  PrepTotals totals = synth_write_dataset(&config);
  printf("wrote %llu tokens in %llu examples to %d shards in %s\n", (unsigned long long)totals.tokens,
         (unsigned long long)config.examples, totals.shards, config.output);
  return 0;
}

static int command_inspect(int argc, char **argv) {
  if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
    fputs(inspect_usage, stdout);
    return 0;
  }
  if (argc != 2 || argv[1][0] == '-') usage_error(inspect_usage, "%s", "inspect takes one dataset directory");
  DatasetSummary summary = dataset_inspect(argv[1]);
  printf("dataset:           %s\n", argv[1]);
  printf("shards:            %d\n", summary.shards);
  printf("tokens:            %llu\n", (unsigned long long)summary.tokens);
  printf("documents:         %llu\n", (unsigned long long)summary.documents);
  printf("mean doc length:   %.1f\n", (double)summary.tokens / (double)summary.documents);
  printf("vocab size:        %llu\n", (unsigned long long)summary.vocab_size);
  printf("tokenizer:         %s\n", summary.tokenizer);
  printf("loss mask:         %s\n", summary.has_loss_mask ? "yes" : "no");
  printf("ok\n");
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) usage_error(main_usage, "%s", "no command given");
  const char *command = argv[1];
  if (strcmp(command, "--help") == 0 || strcmp(command, "-h") == 0 || strcmp(command, "help") == 0) {
    fputs(main_usage, stdout);
    return 0;
  }
  if (strcmp(command, "prep") == 0) return command_prep(argc - 1, argv + 1);
  if (strcmp(command, "synth") == 0) return command_synth(argc - 1, argv + 1);
  if (strcmp(command, "inspect") == 0) return command_inspect(argc - 1, argv + 1);
  usage_error(main_usage, "unknown command '%s'", command);
  return KLT_EXIT_USER_ERROR;
}
