// The configuration key table, INI reading with includes, overrides and printing; see config.h.
#include "train/config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"

typedef enum { KEY_INT, KEY_LONG, KEY_FLOAT, KEY_BOOL, KEY_STRING, KEY_CHOICE } KeyType;

typedef struct {
  const char *section;
  const char *name;
  KeyType type;
  size_t offset;
  size_t size;  // for strings and choices: capacity of the char array
  const char *default_value;
  double min, max;      // inclusive range for numbers
  const char *choices;  // "a|b|c" for KEY_CHOICE
  const char *doc;
} ConfigKey;

#define NUM(sec, field, type, def, lo, hi, doc) \
  {#sec, #field, type, offsetof(Config, sec.field), 0, def, lo, hi, NULL, doc}
#define STR(sec, field, def, doc) \
  {#sec, #field, KEY_STRING, offsetof(Config, sec.field), sizeof(((Config *)0)->sec.field), def, 0, 0, NULL, doc}
#define CHOICE(sec, field, def, choices, doc) \
  {#sec, #field, KEY_CHOICE, offsetof(Config, sec.field), sizeof(((Config *)0)->sec.field), def, 0, 0, choices, doc}
#define BOOL(sec, field, def, doc) {#sec, #field, KEY_BOOL, offsetof(Config, sec.field), 0, def, 0, 1, NULL, doc}

static const ConfigKey keys[] = {
    STR(model, name, "tiny", "A name for the model, printed and stored in checkpoints."),
    NUM(model, vocab_size, KEY_INT, "257", 2, 1 << 30, "Vocabulary size (257 for the byte tokenizer)."),
    NUM(model, hidden_size, KEY_INT, "128", 8, 1 << 20, "Model width d."),
    NUM(model, num_layers, KEY_INT, "4", 1, 1024, "Number of decoder layers."),
    STR(model, layers, "", "Mixer kind of every layer, comma-separated (kda or mla); empty: use full_attn_every."),
    NUM(model, full_attn_every, KEY_INT, "4", 0, 1024,
        "With layers empty: layer i (0-based) is mla when (i+1) is a multiple of this or i is the last layer; 0: all kda."),
    NUM(model, first_k_dense, KEY_INT, "1", 0, 1024, "The first this-many layers use a dense SwiGLU FFN, the rest MoE."),
    NUM(model, dense_intermediate_size, KEY_INT, "512", 1, 1 << 20, "Width of the dense SwiGLU FFN."),
    NUM(model, rms_norm_eps, KEY_FLOAT, "1e-5", 0, 1, "Epsilon of every RMSNorm."),
    NUM(model, init_std, KEY_FLOAT, "0.02", 0, 10, "Standard deviation of the normal init of linear and embedding weights."),

    NUM(kda, heads, KEY_INT, "2", 1, 4096, "KDA heads."),
    NUM(kda, head_dim, KEY_INT, "32", 1, 1024, "KDA head dimension (dk = dv)."),
    NUM(kda, conv_size, KEY_INT, "4", 1, 64, "Kernel size of the short causal convolutions on q, k, v."),
    CHOICE(kda, gate, "softplus", "softplus|bounded",
           "Decay gate: softplus (as released: -exp(A_log)*softplus(f+dt_bias)) or bounded (lb*sigmoid(exp(A_log)*(f+dt_bias)))."),
    NUM(kda, gate_lower_bound, KEY_FLOAT, "-5", -5, -1e-6, "Lower bound lb of the bounded gate, in [-5, 0)."),
    NUM(kda, chunk_size, KEY_INT, "64", 1, 1024, "Chunk length of the chunkwise KDA algorithm."),

    NUM(mla, heads, KEY_INT, "2", 1, 4096, "MLA heads."),
    NUM(mla, kv_lora_rank, KEY_INT, "64", 1, 1 << 16, "Rank of the compressed key-value latent."),
    NUM(mla, qk_nope_dim, KEY_INT, "32", 1, 1024, "Per-head query/key dimension without position encoding."),
    NUM(mla, qk_pe_dim, KEY_INT, "16", 0, 1024, "Per-head query dimension of the (unrotated) 'rope' slot; its key part is shared by all heads."),
    NUM(mla, v_dim, KEY_INT, "32", 1, 1024, "Per-head value dimension."),

    NUM(moe, num_experts, KEY_INT, "8", 1, 1 << 16, "Routed experts per MoE layer."),
    NUM(moe, experts_per_token, KEY_INT, "2", 1, 1024, "Routed experts chosen per token (top-k)."),
    NUM(moe, num_shared_experts, KEY_INT, "1", 0, 64, "Shared experts (always applied, unweighted)."),
    NUM(moe, intermediate_size, KEY_INT, "128", 1, 1 << 20, "Width of each expert's SwiGLU."),
    NUM(moe, routed_scaling_factor, KEY_FLOAT, "2.446", 0, 1000, "Multiplies the renormalized routing weights."),
    NUM(moe, bias_update_rate, KEY_FLOAT, "1e-3", 0, 1, "Aux-loss-free balancing: bias += rate*sign(mean_load-load) after each step; 0 disables."),
    NUM(moe, aux_loss_coef, KEY_FLOAT, "0", 0, 1, "Coefficient of the sequence-wise auxiliary balance loss (0: off)."),

    CHOICE(train, device, "cpu", "cpu|cuda", "Where the model runs: cpu, or cuda (one GPU per rank; ranks from mpirun, NCCL between them)."),
    NUM(train, seed, KEY_LONG, "1234", 0, 9.2e18, "Seed of initialization and data order."),
    NUM(train, micro_batches, KEY_INT, "1", 1, 1 << 20, "Gradient accumulation: each rank's share of a step is split into this many micro-batches."),
    NUM(train, val_every, KEY_INT, "100", 0, 1 << 30, "Validation loss every this-many steps (and at the end); 0: only at the end."),
    NUM(train, val_batches, KEY_INT, "8", 0, 1 << 20, "Validation batches per evaluation (at most the validation split holds)."),
    NUM(train, step_timeout, KEY_FLOAT, "1800", 0, 1e9,
        "Seconds a step (validation and checkpoint included) may take before the rank stops with a message, so a hung or dead rank never hangs the job; 0: no limit."),
    STR(train, run_dir, "runs/default", "Directory for metrics.jsonl and checkpoints."),

    CHOICE(optim, optimizer, "muonclip", "muonclip|adamw", "muonclip: Muon for 2-D matrices plus QK-Clip, AdamW for the rest; adamw: AdamW for everything."),
    NUM(optim, lr, KEY_FLOAT, "3e-3", 0, 10, "Peak learning rate (shared by Muon and AdamW)."),
    NUM(optim, weight_decay, KEY_FLOAT, "0.1", 0, 10, "Decoupled weight decay (shared by Muon and AdamW)."),
    BOOL(optim, decay_matrices, "true", "Apply weight decay to the 2-D matrices (the Muon group under muonclip)."),
    BOOL(optim, decay_norms, "true", "Apply weight decay to norm gains too (Moonlight found it matters)."),
    BOOL(optim, decay_embeddings, "true", "Apply weight decay to the embedding and the lm head."),
    NUM(optim, adam_beta1, KEY_FLOAT, "0.9", 0, 0.999999, "AdamW beta1."),
    NUM(optim, adam_beta2, KEY_FLOAT, "0.95", 0, 0.999999, "AdamW beta2."),
    NUM(optim, adam_eps, KEY_FLOAT, "1e-8", 0, 1, "AdamW epsilon."),
    NUM(optim, muon_momentum, KEY_FLOAT, "0.95", 0, 0.999999, "Muon momentum."),
    BOOL(optim, muon_nesterov, "true", "Nesterov momentum in Muon."),
    NUM(optim, muon_ns_steps, KEY_INT, "5", 1, 100, "Newton-Schulz iterations."),
    NUM(optim, qk_clip_tau, KEY_FLOAT, "100", 0, 1e30, "QK-Clip threshold on the per-head maximum scaled attention logit; 0 disables."),
    NUM(optim, grad_clip, KEY_FLOAT, "1.0", 0, 1e30, "Clip the global gradient norm to this; 0 disables."),

    STR(data, path, "data/sample/shards", "Dataset directory of HDF5 token shards (klt-data prep writes them)."),
    NUM(data, val_fraction, KEY_FLOAT, "0.05", 0, 0.5, "Fraction of the windows held out for validation (the last ones)."),

    NUM(parallel, dp, KEY_INT, "1", 1, 1 << 20, "Data-parallel ranks (world = dp x cp)."),
    NUM(parallel, ep, KEY_INT, "1", 1, 1 << 20, "Expert-parallel ranks inside each data-parallel group (divides dp)."),
    NUM(parallel, cp, KEY_INT, "1", 1, 1 << 20, "Context-parallel ranks."),

    STR(stage, name, "pretrain", "Stage name (stored with the loader state)."),
    NUM(stage, seq_len, KEY_INT, "256", 1, 1 << 30, "Tokens per sample."),
    NUM(stage, global_batch, KEY_INT, "16", 1, 1 << 30, "Samples per optimizer step, over all ranks."),
    NUM(stage, steps, KEY_LONG, "1000", 1, 9.2e18, "Optimizer steps in this stage."),
    CHOICE(stage, schedule, "wsd", "wsd|cosine|constant", "Learning-rate schedule."),
    CHOICE(stage, schedule_unit, "steps", "steps|tokens", "Unit of warmup (and of the schedule's position)."),
    NUM(stage, warmup, KEY_FLOAT, "50", 0, 1e18, "Linear warmup length, in schedule_unit."),
    NUM(stage, decay_fraction, KEY_FLOAT, "0.2", 0, 1, "WSD: final fraction of the stage spent decaying."),
    CHOICE(stage, decay_shape, "1-sqrt", "linear|cosine|1-sqrt", "WSD: shape of the decay."),
    NUM(stage, lr_floor, KEY_FLOAT, "0.1", 0, 1, "Final learning rate as a fraction of the peak."),
    STR(stage, init_from, "", "Checkpoint whose weights start this stage (fresh optimizer and data state); empty: random init."),

    NUM(ckpt, every, KEY_INT, "0", 0, 1 << 30, "Save a checkpoint every this-many steps (0: only at the end and on SIGTERM/SIGINT)."),
    NUM(ckpt, keep, KEY_INT, "3", 1, 1 << 20, "Keep the last this-many checkpoints."),

    NUM(log, every, KEY_INT, "1", 1, 1 << 30, "Print and record a metrics line every this-many steps."),
};
#define NUM_KEYS ((int)(sizeof(keys) / sizeof(keys[0])))

int config_key_count(void) { return NUM_KEYS; }
const char *config_key_section(int i) { return keys[i].section; }
const char *config_key_name(int i) { return keys[i].name; }
const char *config_key_default(int i) { return keys[i].default_value; }
const char *config_key_doc(int i) { return keys[i].doc; }

// Where a value came from, for messages: "FILE:LINE" or "--set".
typedef struct {
  char where[CONFIG_STRING_MAX * 2 + 32];
  char message[2048];
} ConfigError;

static const ConfigKey *find_key(const char *section, const char *name) {
  for (int i = 0; i < NUM_KEYS; i++)
    if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0) return &keys[i];
  return NULL;
}

static bool section_exists(const char *section) {
  for (int i = 0; i < NUM_KEYS; i++)
    if (strcmp(keys[i].section, section) == 0) return true;
  return false;
}

static void list_sections(char *out, size_t cap) {
  out[0] = '\0';
  for (int i = 0; i < NUM_KEYS; i++) {
    if (i > 0 && strcmp(keys[i].section, keys[i - 1].section) == 0) continue;
    snprintf(out + strlen(out), cap - strlen(out), "%s[%s]", i ? " " : "", keys[i].section);
  }
}

static void list_keys(const char *section, char *out, size_t cap) {
  out[0] = '\0';
  for (int i = 0; i < NUM_KEYS; i++)
    if (strcmp(keys[i].section, section) == 0)
      snprintf(out + strlen(out), cap - strlen(out), "%s%s", out[0] ? ", " : "", keys[i].name);
}

static void describe_accepted(const ConfigKey *key, char *out, size_t cap) {
  switch (key->type) {
    case KEY_INT:
    case KEY_LONG: snprintf(out, cap, "an integer in [%.0f, %.0f]", key->min, key->max); break;
    case KEY_FLOAT: snprintf(out, cap, "a number in [%g, %g]", key->min, key->max); break;
    case KEY_BOOL: snprintf(out, cap, "true or false"); break;
    case KEY_STRING: snprintf(out, cap, "a string of at most %zu characters", key->size - 1); break;
    case KEY_CHOICE: snprintf(out, cap, "one of %s", key->choices); break;
  }
}

static bool choice_allowed(const char *choices, const char *value) {
  size_t n = strlen(value);
  for (const char *p = choices; *p;) {
    const char *bar = strchr(p, '|');
    size_t len = bar ? (size_t)(bar - p) : strlen(p);
    if (len == n && strncmp(p, value, n) == 0) return true;
    if (!bar) break;
    p = bar + 1;
  }
  return false;
}

// Parses and stores one value; false (with error->message set) when it is not acceptable.
static bool set_value(Config *config, const ConfigKey *key, const char *value, ConfigError *error) {
  char *base = (char *)config + key->offset;
  char accepted[256];
  describe_accepted(key, accepted, sizeof accepted);
  char *end = NULL;
  errno = 0;
  switch (key->type) {
    case KEY_INT:
    case KEY_LONG: {
      long long v = strtoll(value, &end, 10);
      if (end == value || *end != '\0' || errno == ERANGE || (double)v < key->min || (double)v > key->max) {
        snprintf(error->message, sizeof error->message, "[%s] %s = '%s' is not %s", key->section, key->name,
                 value, accepted);
        return false;
      }
      if (key->type == KEY_INT) *(int *)base = (int)v;
      else *(long long *)base = v;
      return true;
    }
    case KEY_FLOAT: {
      double v = strtod(value, &end);
      if (end == value || *end != '\0' || errno == ERANGE || !isfinite(v) || v < key->min || v > key->max) {
        snprintf(error->message, sizeof error->message, "[%s] %s = '%s' is not %s", key->section, key->name,
                 value, accepted);
        return false;
      }
      *(double *)base = v;
      return true;
    }
    case KEY_BOOL: {
      bool v;
      if (!strcmp(value, "true") || !strcmp(value, "1") || !strcmp(value, "yes")) v = true;
      else if (!strcmp(value, "false") || !strcmp(value, "0") || !strcmp(value, "no")) v = false;
      else {
        snprintf(error->message, sizeof error->message, "[%s] %s = '%s' is not %s", key->section, key->name,
                 value, accepted);
        return false;
      }
      *(bool *)base = v;
      return true;
    }
    case KEY_CHOICE:
      if (!choice_allowed(key->choices, value)) {
        snprintf(error->message, sizeof error->message, "[%s] %s = '%s' is not %s", key->section, key->name,
                 value, accepted);
        return false;
      }
      /* fall through */
    case KEY_STRING:
      if (strlen(value) >= key->size) {
        snprintf(error->message, sizeof error->message, "[%s] %s is too long: %s", key->section, key->name,
                 accepted);
        return false;
      }
      strcpy(base, value);
      return true;
  }
  return false;
}

void config_set_defaults(Config *config) {
  memset(config, 0, sizeof *config);
  ConfigError error;
  for (int i = 0; i < NUM_KEYS; i++)
    CHECK(set_value(config, &keys[i], keys[i].default_value, &error), "bad default in the key table: %s",
          error.message);
}

// Checks section and key, then sets; false with error->message on failure.
static bool assign(Config *config, const char *section, const char *name, const char *value, ConfigError *error) {
  if (!section_exists(section)) {
    char sections[512];
    list_sections(sections, sizeof sections);
    snprintf(error->message, sizeof error->message, "unknown section [%s]; accepted sections: %s", section,
             sections);
    return false;
  }
  const ConfigKey *key = find_key(section, name);
  if (!key) {
    char names[1024];
    list_keys(section, names, sizeof names);
    snprintf(error->message, sizeof error->message, "unknown key '%s' in section [%s]; accepted keys: %s", name,
             section, names);
    return false;
  }
  return set_value(config, key, value, error);
}

#define MAX_INCLUDE_DEPTH 16

typedef struct {
  Config *config;
  const char *path;
  int depth;
  ConfigError *error;  // first error, with the innermost file and line
  bool failed;
} ParseContext;

static bool parse_file(Config *config, const char *path, int depth, ConfigError *error);

static int handle_ini_entry(void *user, const char *section, const char *name, const char *value) {
  ParseContext *ctx = user;
  if (ctx->failed) return 1;  // report only the first problem
  if (strcmp(name, "include") == 0) {
    char resolved[CONFIG_STRING_MAX * 2];
    const char *slash = strrchr(ctx->path, '/');
    if (value[0] == '/' || !slash) snprintf(resolved, sizeof resolved, "%s", value);
    else snprintf(resolved, sizeof resolved, "%.*s/%s", (int)(slash - ctx->path), ctx->path, value);
    if (ctx->depth + 1 >= MAX_INCLUDE_DEPTH) {
      snprintf(ctx->error->message, sizeof ctx->error->message,
               "includes nest deeper than %d files (an include cycle?) at '%.400s'", MAX_INCLUDE_DEPTH, resolved);
      ctx->failed = true;
      return 0;
    }
    if (!parse_file(ctx->config, resolved, ctx->depth + 1, ctx->error)) {
      ctx->failed = true;
      return 0;
    }
    return 1;
  }
  if (section[0] == '\0') {
    snprintf(ctx->error->message, sizeof ctx->error->message, "key '%s' is outside any section (only include may be)",
             name);
    ctx->failed = true;
    return 0;
  }
  if (!assign(ctx->config, section, name, value, ctx->error)) {
    ctx->failed = true;
    return 0;
  }
  return 1;
}

// False with *error filled (where = "FILE:LINE") on the first problem.
static bool parse_file(Config *config, const char *path, int depth, ConfigError *error) {
  ParseContext ctx = {.config = config, .path = path, .depth = depth, .error = error};
  error->where[0] = '\0';
  int line = ini_parse(path, handle_ini_entry, &ctx);
  if (line == -1) {
    snprintf(error->where, sizeof error->where, "%s", path);
    snprintf(error->message, sizeof error->message, "cannot open the config file (%s)", strerror(errno));
    return false;
  }
  if (line == -2) {
    snprintf(error->where, sizeof error->where, "%s", path);
    snprintf(error->message, sizeof error->message, "out of memory while reading");
    return false;
  }
  if (line > 0) {
    if (error->where[0] == '\0') {  // the error is in this file, not in an included one
      snprintf(error->where, sizeof error->where, "%s:%d", path, line);
      if (!ctx.failed) snprintf(error->message, sizeof error->message, "this line is not INI syntax ([section] or key = value)");
    }
    return false;
  }
  return true;
}

void config_load_file(Config *config, const char *path) {
  ConfigError error;
  if (!parse_file(config, path, 0, &error)) klt_user_error("%s: %s", error.where, error.message);
}

void config_set_override(Config *config, const char *assignment) {
  ConfigError error;
  const char *dot = strchr(assignment, '.');
  const char *eq = strchr(assignment, '=');
  if (!dot || !eq || dot > eq || dot == assignment || eq == dot + 1)
    klt_user_error("--set %s: expected section.key=value, e.g. --set optim.lr=1e-3", assignment);
  char section[128], name[128];
  snprintf(section, sizeof section, "%.*s", (int)(dot - assignment), assignment);
  snprintf(name, sizeof name, "%.*s", (int)(eq - dot - 1), dot + 1);
  if (!assign(config, section, name, eq + 1, &error)) klt_user_error("--set %s: %s", assignment, error.message);
}

static void format_value(const Config *config, const ConfigKey *key, char *out, size_t cap) {
  const char *base = (const char *)config + key->offset;
  switch (key->type) {
    case KEY_INT: snprintf(out, cap, "%d", *(const int *)base); break;
    case KEY_LONG: snprintf(out, cap, "%lld", *(const long long *)base); break;
    case KEY_FLOAT: {  // shortest form that reads back to the same double
      double v = *(const double *)base;
      for (int digits = 6; digits <= 17; digits++) {
        snprintf(out, cap, "%.*g", digits, v);
        if (strtod(out, NULL) == v) break;
      }
      break;
    }
    case KEY_BOOL: snprintf(out, cap, "%s", *(const bool *)base ? "true" : "false"); break;
    case KEY_STRING:
    case KEY_CHOICE: snprintf(out, cap, "%s", base); break;
  }
}

void config_print(const Config *config, FILE *out) {
  for (int i = 0; i < NUM_KEYS; i++) {
    if (i == 0 || strcmp(keys[i].section, keys[i - 1].section) != 0) fprintf(out, "%s[%s]\n", i ? "\n" : "", keys[i].section);
    char value[CONFIG_STRING_MAX + 64];
    format_value(config, &keys[i], value, sizeof value);
    fprintf(out, "%s = %s\n", keys[i].name, value);
  }
}

bool config_layer_is_mla(const Config *config, int layer) {
  const char *list = config->model.layers;
  if (list[0] == '\0') {
    int every = config->model.full_attn_every;
    return every > 0 && ((layer + 1) % every == 0 || layer == config->model.num_layers - 1);
  }
  const char *p = list;
  for (int i = 0; i < layer && p; i++) {
    p = strchr(p, ',');
    if (p) p++;
  }
  CHECK(p != NULL, "layer %d beyond the validated layer list '%s'", layer, list);
  while (*p == ' ') p++;
  return strncmp(p, "mla", 3) == 0;
}

void config_validate(const Config *config) {
  const ModelSection *m = &config->model;
  if (m->layers[0] != '\0') {
    int count = 0;
    char copy[CONFIG_STRING_MAX];
    snprintf(copy, sizeof copy, "%s", m->layers);
    for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
      while (*tok == ' ') tok++;
      char *end = tok + strlen(tok);
      while (end > tok && end[-1] == ' ') *--end = '\0';
      if (strcmp(tok, "kda") != 0 && strcmp(tok, "mla") != 0)
        klt_user_error("[model] layers: '%s' is not a mixer kind; each entry must be kda or mla", tok);
      count++;
    }
    if (count != m->num_layers)
      klt_user_error("[model] layers lists %d mixers but num_layers = %d; give one kind per layer", count,
                     m->num_layers);
  }
  if (m->first_k_dense > m->num_layers)
    klt_user_error("[model] first_k_dense = %d exceeds num_layers = %d", m->first_k_dense, m->num_layers);
  if (config->moe.experts_per_token > config->moe.num_experts)
    klt_user_error("[moe] experts_per_token = %d exceeds num_experts = %d", config->moe.experts_per_token,
                   config->moe.num_experts);
  const ParallelSection *p = &config->parallel;
  if (p->dp % p->ep != 0)
    klt_user_error("[parallel] ep = %d must divide dp = %d", p->ep, p->dp);
  if (config->moe.num_experts % p->ep != 0)
    klt_user_error("[parallel] ep = %d must divide [moe] num_experts = %d", p->ep, config->moe.num_experts);
  const StageSection *s = &config->stage;
  if (s->global_batch % (p->dp * config->train.micro_batches) != 0)
    klt_user_error("[stage] global_batch = %d must be a multiple of [parallel] dp x [train] micro_batches = %d",
                   s->global_batch, p->dp * config->train.micro_batches);
}
