/* Sharded HDF5 checkpoints: what a run needs to continue exactly where it stopped, possibly on another
 * number of ranks. <run_dir>/ckpt/step_NNNNNNNN/ holds one file per rank, rank_RRRRR.h5, with the
 * tensor slices that rank owns: dataset <name> for the weights and optimizer/state1/<name>,
 * optimizer/state2/<name> for the optimizer state, each with attributes global_shape, offset (of the
 * slice in the whole tensor) and checksum (CRC-32 of the stored bytes). Values are stored in the
 * build's `real` type (float32 in klt-train, float64 in the tests), so a save and load in one build
 * round-trip bit for bit; a load converts from whichever of the two the file holds. Rank 0 writes
 * manifest.h5 last (step, tokens, loader state, optimizer step, world size, model name, config text,
 * every rank file with its size and CRC-32); the checkpoint is written in step_NNNNNNNN.partial/ and
 * only renamed to its final name, and ckpt/latest moved to it, once the manifest is complete. A
 * directory without a manifest is not a checkpoint. Loading checks the files against the manifest,
 * every dataset's checksum, and every tensor's shape against the registry, and reports any problem as
 * one user error (exit code 2). */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/real.h"
#include "data/loader.h"
#include "dist/world.h"
#include "train/params.h"
#include "train/shard_plan.h"

typedef struct {
  long step;                // training steps completed
  double tokens;            // training tokens seen
  LoaderState loader;       // (stage, consumed_samples, seed): the next batch, whatever the rank count
  long optimizer_step;      // the optimizer's own count (AdamW bias correction)
  char model_name[128];
} CheckpointMeta;

// Saves the registry's values and, where not NULL, the optimizer states as checkpoint meta->step of
// run_dir. Every rank of `world` calls it (NULL: a single process); each writes the slices it owns:
// the rows of every tensor inside its range `owned` of the arena (the sharded optimizer's; it must cut
// tensors between rows only, and the ranks' ranges must cover the arena once), with state1 and state2
// holding the states of exactly that range (element j of the arena at [j - owned->begin]). owned NULL:
// rank 0 writes everything, and the states are whole arenas (params->total) parallel to
// params->values. Rank 0 commits and then deletes older checkpoints so that the newest `keep` remain
// (0 keeps all). Checkpoints with a higher step, left from before a resume to an earlier one, are kept;
// saving their step again replaces them. Returns the seconds taken.
double checkpoint_save(const char *run_dir, const CheckpointMeta *meta, const ParamRegistry *params,
                       const real *state1, const real *state2, const ArenaRange *owned, const char *config_text,
                       int keep, const World *world);

// The newest committed checkpoint of run_dir (where ckpt/latest points, or else the highest step with
// a manifest) into path_out; false when there is none yet. Says so when it skips an interrupted save.
bool checkpoint_find_latest(const char *run_dir, char *path_out, size_t cap);

// Loads the checkpoint directory `path` into params->values (whole, whatever rank count saved it) and,
// where not NULL, the optimizer states: of the arena range state_range only (a sharded optimizer's
// owned range; element j at [j - state_range->begin]), or whole arenas (params->total) when
// state_range is NULL; state1 = state2 = NULL loads the weights only ([stage] init_from). Fills meta
// from the manifest. Any missing, truncated, corrupted or mismatching piece is a user error (exit code
// 2). report_progress prints a progress line each second for loads that take longer than one.
void checkpoint_load(const char *path, CheckpointMeta *meta, ParamRegistry *params, real *state1,
                     real *state2, const ArenaRange *state_range, bool report_progress);

// The config text stored in the checkpoint's manifest (caller frees); user error when unreadable.
char *checkpoint_read_config(const char *path);

// Checks a checkpoint without a model: manifest, rank files (present, sizes), tensors (slices cover
// each global shape once), and with verify_checksums every file's and dataset's CRC-32. With listing
// not NULL, writes what the checkpoint holds there. Returns true when consistent; otherwise false with
// one sentence in problem.
bool checkpoint_check(const char *path, bool verify_checksums, FILE *listing, char *problem, size_t cap);

// CRC-32 (the zlib / PNG polynomial), continued from crc (start with 0).
uint32_t checkpoint_crc32(uint32_t crc, const void *bytes, size_t count);
