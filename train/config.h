/* The run configuration: every key klt-train accepts, its type, default, accepted range and a line of
 * documentation, in one table (config.c), read from INI files with inih. A file may `include =` others
 * (paths relative to the including file; later keys win), and `--set section.key=value` overrides any
 * key from the command line. An unknown section or key, a malformed number or a value out of range is
 * a user error naming file, line and key and the accepted values (exit code 2). configs/README.md
 * documents every key with its default; a test keeps it true. */
#pragma once
#include <stdbool.h>
#include <stdio.h>

#define CONFIG_STRING_MAX 512

typedef struct {
  char name[CONFIG_STRING_MAX];
  int vocab_size;
  int hidden_size;
  int num_layers;
  char layers[CONFIG_STRING_MAX];  // comma-separated mixer kinds, or empty to use full_attn_every
  int full_attn_every;
  int first_k_dense;
  int dense_intermediate_size;
  double rms_norm_eps;
  double init_std;
} ModelSection;

typedef struct {
  int heads;
  int head_dim;
  int conv_size;
  char gate[16];  // softplus | bounded
  double gate_lower_bound;
  int chunk_size;
} KdaSection;

typedef struct {
  int heads;
  int kv_lora_rank;
  int qk_nope_dim;
  int qk_pe_dim;
  int v_dim;
} MlaSection;

typedef struct {
  int num_experts;
  int experts_per_token;
  int num_shared_experts;
  int intermediate_size;
  double routed_scaling_factor;
  double bias_update_rate;
  double aux_loss_coef;
} MoeSection;

typedef struct {
  char device[16];  // cpu | cuda
  long long seed;
  int micro_batches;
  int val_every;
  int val_batches;
  double step_timeout;
  char run_dir[CONFIG_STRING_MAX];
} TrainSection;

typedef struct {
  char optimizer[16];  // muonclip | adamw
  double lr;
  double weight_decay;
  bool decay_matrices;
  bool decay_norms;
  bool decay_embeddings;
  double adam_beta1;
  double adam_beta2;
  double adam_eps;
  double muon_momentum;
  bool muon_nesterov;
  int muon_ns_steps;
  double qk_clip_tau;
  double grad_clip;
} OptimSection;

typedef struct {
  char path[CONFIG_STRING_MAX];
  double val_fraction;
} DataSection;

typedef struct {
  int dp;
  int ep;
  int cp;
} ParallelSection;

typedef struct {
  char name[64];
  int seq_len;
  int global_batch;
  long long steps;
  char schedule[16];  // wsd | cosine | constant
  char schedule_unit[16];  // steps | tokens
  double warmup;
  double decay_fraction;
  char decay_shape[16];  // linear | cosine | 1-sqrt
  double lr_floor;
  char init_from[CONFIG_STRING_MAX];
} StageSection;

typedef struct {
  int every;
  int keep;
} CkptSection;

typedef struct {
  int every;
} LogSection;

typedef struct {
  ModelSection model;
  KdaSection kda;
  MlaSection mla;
  MoeSection moe;
  TrainSection train;
  OptimSection optim;
  DataSection data;
  ParallelSection parallel;
  StageSection stage;
  CkptSection ckpt;
  LogSection log;
} Config;

// Every key at its default.
void config_set_defaults(Config *config);
// Reads an INI file (and its includes) on top of what config holds. User errors exit with code 2.
void config_load_file(Config *config, const char *path);
// Applies one "section.key=value" override. User errors exit with code 2.
void config_set_override(Config *config, const char *assignment);
// Checks relations between keys (e.g. layer pattern length, head dims); user errors exit with code 2.
void config_validate(const Config *config);
// Whether layer i (0-based) mixes with MLA (else KDA), from [model] layers or full_attn_every.
bool config_layer_is_mla(const Config *config, int layer);
// Writes the whole configuration as an INI file that config_load_file reads back to the same values.
void config_print(const Config *config, FILE *out);

// The key table, for documentation checks: key i's "section.key", default and description.
int config_key_count(void);
const char *config_key_section(int i);
const char *config_key_name(int i);
const char *config_key_default(int i);
const char *config_key_doc(int i);
