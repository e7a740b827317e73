// Sharded HDF5 checkpoints: save, find, load and check; see checkpoint.h for the format.
#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/check.h"
#include "data/h5io.h"

// Checksums are taken over the bytes as stored (little-endian IEEE), which on the machines klt runs
// on are the bytes in memory.
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checkpoint checksums assume little-endian");

#define CHECKPOINT_FORMAT_VERSION 1
#define PATH_CAP 4096
#define RANK_FILE_NAME_CAP 32
#define PROBLEM_CAP 1024

// The three arenas a checkpoint holds per tensor, and the group each one's datasets live in.
enum { KIND_VALUES, KIND_STATE1, KIND_STATE2, KIND_COUNT };
static const char *const kind_prefix[KIND_COUNT] = {"", "optimizer/state1/", "optimizer/state2/"};
static const char *const kind_group[KIND_COUNT] = {"/", "optimizer/state1", "optimizer/state2"};

// ---------------------------------------------------------------------------------------------
// Small helpers

static pthread_once_t crc_table_once = PTHREAD_ONCE_INIT;
static uint32_t crc_table[8][256];  // [k][b]: CRC of byte b followed by k zero bytes

static void crc_table_build(void) {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[0][n] = c;
  }
  for (int k = 1; k < 8; k++)
    for (int n = 0; n < 256; n++) crc_table[k][n] = (crc_table[k - 1][n] >> 8) ^ crc_table[0][crc_table[k - 1][n] & 0xFF];
}

// Eight bytes per step (slicing-by-8): checksums are taken over every byte saved and loaded twice, so
// their speed is a visible share of checkpoint time.
uint32_t checkpoint_crc32(uint32_t crc, const void *bytes, size_t count) {
  pthread_once(&crc_table_once, crc_table_build);
  const unsigned char *p = bytes;
  crc = ~crc;
  for (; count >= 8; count -= 8, p += 8) {
    uint32_t low, high;
    memcpy(&low, p, 4);
    memcpy(&high, p + 4, 4);
    low ^= crc;
    crc = crc_table[7][low & 0xFF] ^ crc_table[6][(low >> 8) & 0xFF] ^ crc_table[5][(low >> 16) & 0xFF] ^
          crc_table[4][low >> 24] ^ crc_table[3][high & 0xFF] ^ crc_table[2][(high >> 8) & 0xFF] ^
          crc_table[1][(high >> 16) & 0xFF] ^ crc_table[0][high >> 24];
  }
  for (; count > 0; count--, p++) crc = crc_table[0][(crc ^ *p) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

static bool fail(char *problem, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool fail(char *problem, size_t cap, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(problem, cap, fmt, args);
  va_end(args);
  return false;
}

static void path_join(char *out, const char *directory, const char *name) {
  int n = snprintf(out, PATH_CAP, "%s/%s", directory, name);
  if (n < 0 || n >= PATH_CAP) klt_user_error("checkpoint path %s/%s is too long; use a shorter run_dir", directory, name);
}

// base + suffix, e.g. a temporary name for a file written and then renamed.
static void path_suffix(char *out, const char *base, const char *suffix) {
  size_t base_length = strlen(base), suffix_length = strlen(suffix);
  if (base_length + suffix_length >= PATH_CAP)
    klt_user_error("checkpoint path %s%s is too long; use a shorter run_dir", base, suffix);
  memcpy(out, base, base_length);
  memcpy(out + base_length, suffix, suffix_length + 1);
}

static bool path_exists(const char *path) {
  struct stat info;
  return stat(path, &info) == 0;
}

static void make_directories(const char *path) {
  char partial[PATH_CAP];
  snprintf(partial, sizeof partial, "%s", path);
  for (char *p = partial + 1;; p++) {
    if (*p != '/' && *p != '\0') continue;
    char saved = *p;
    *p = '\0';
    if (mkdir(partial, 0755) != 0 && errno != EEXIST)
      klt_user_error("could not create directory %s (%s); check that run_dir is writable", partial, strerror(errno));
    *p = saved;
    if (saved == '\0') break;
  }
}

// Flushes a file's or directory's contents to the disk, so that a rename after it never names a file
// whose data a power loss could still take. Failure only costs that guarantee, so it is not reported.
static void sync_path(const char *path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return;
  fsync(fd);
  close(fd);
}

// Removes a checkpoint directory: the manifest first, so that an interrupted removal leaves no
// directory that still looks committed.
static void remove_checkpoint_directory(const char *path) {
  char entry_path[PATH_CAP];
  path_join(entry_path, path, "manifest.h5");
  unlink(entry_path);
  DIR *directory = opendir(path);
  if (!directory) return;
  struct dirent *entry;
  while ((entry = readdir(directory)) != NULL) {
    if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
    path_join(entry_path, path, entry->d_name);
    if (unlink(entry_path) != 0)
      fprintf(stderr, "checkpoint: could not remove %s (%s)\n", entry_path, strerror(errno));
  }
  closedir(directory);
  if (rmdir(path) != 0) fprintf(stderr, "checkpoint: could not remove %s (%s)\n", path, strerror(errno));
}

// A progress line each second once an operation has taken more than one.
typedef struct {
  const char *verb;
  const char *path;
  bool enabled;
  double start, last_report;
  double done, total;  // bytes
} Progress;

static Progress progress_start(const char *verb, const char *path, double total_bytes, bool enabled) {
  double now = klt_now_seconds();
  return (Progress){.verb = verb, .path = path, .enabled = enabled, .start = now, .last_report = now,
                    .total = total_bytes};
}

static void progress_add(Progress *progress, double bytes) {
  progress->done += bytes;
  if (!progress->enabled) return;
  double now = klt_now_seconds();
  if (now - progress->start < 1 || now - progress->last_report < 1) return;
  printf("checkpoint: %s %s: %.0f%% of %.1f MB (%.1f s)\n", progress->verb, progress->path,
         100 * progress->done / (progress->total > 0 ? progress->total : 1), progress->total / 1e6,
         now - progress->start);
  fflush(stdout);
  progress->last_report = now;
}

static bool file_crc32(const char *path, uint32_t *crc, uint64_t *bytes, Progress *progress) {
  FILE *file = fopen(path, "rb");
  if (!file) return false;
  size_t block = 4 << 20;
  unsigned char *buffer = klt_malloc(block);
  *crc = 0;
  *bytes = 0;
  size_t got;
  while ((got = fread(buffer, 1, block, file)) > 0) {
    *crc = checkpoint_crc32(*crc, buffer, got);
    *bytes += got;
    if (progress) progress_add(progress, (double)got);
  }
  bool ok = !ferror(file);
  fclose(file);
  free(buffer);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// HDF5 attributes (callers hold the h5io lock)

static herr_t attribute_write(hid_t object, const char *name, hid_t file_type, hid_t memory_type, int count,
                              const void *value) {
  hsize_t dims[1] = {(hsize_t)count};
  hid_t space = count > 0 ? H5Screate_simple(1, dims, NULL) : H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(object, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
  herr_t status = attribute < 0 ? -1 : H5Awrite(attribute, memory_type, value);
  if (attribute >= 0) H5Aclose(attribute);
  H5Sclose(space);
  return status;
}

static herr_t attribute_write_string(hid_t object, const char *name, const char *value) {
  hid_t type = H5Tcopy(H5T_C_S1);
  H5Tset_size(type, strlen(value) + 1);
  H5Tset_strpad(type, H5T_STR_NULLTERM);
  herr_t status = attribute_write(object, name, type, type, 0, value);
  H5Tclose(type);
  return status;
}

// Reads an attribute of `count` elements (0: a scalar). Returns the element count found, or -1.
static int attribute_read(hid_t object, const char *name, hid_t memory_type, int count, void *value) {
  if (H5Aexists(object, name) <= 0) return -1;
  hid_t attribute = H5Aopen(object, name, H5P_DEFAULT);
  if (attribute < 0) return -1;
  hid_t space = H5Aget_space(attribute);
  hssize_t found = H5Sget_simple_extent_npoints(space);
  H5Sclose(space);
  herr_t status = -1;
  if (found == (count > 0 ? count : 1)) status = H5Aread(attribute, memory_type, value);
  H5Aclose(attribute);
  return status < 0 ? -1 : (int)found;
}

static bool attribute_read_string(hid_t object, const char *name, char *value, size_t cap) {
  if (H5Aexists(object, name) <= 0) return false;
  hid_t attribute = H5Aopen(object, name, H5P_DEFAULT);
  if (attribute < 0) return false;
  hid_t file_type = H5Aget_type(attribute);
  bool ok = H5Tget_class(file_type) == H5T_STRING && !H5Tis_variable_str(file_type) &&
            H5Tget_size(file_type) <= cap;
  if (ok) {
    hid_t memory_type = H5Tcopy(H5T_C_S1);
    H5Tset_size(memory_type, H5Tget_size(file_type));
    ok = H5Aread(attribute, memory_type, value) >= 0;
    H5Tclose(memory_type);
    value[cap - 1] = '\0';
  }
  H5Tclose(file_type);
  H5Aclose(attribute);
  return ok;
}

// Opens an HDF5 file for reading such that closing it closes every object opened in it.
static hid_t file_open_read(const char *path) {
  hid_t access = H5Pcreate(H5P_FILE_ACCESS);
  H5Pset_fclose_degree(access, H5F_CLOSE_STRONG);
  hid_t file = H5Fopen(path, H5F_ACC_RDONLY, access);
  H5Pclose(access);
  return file;
}

// ---------------------------------------------------------------------------------------------
// Which rank stores what

// Rows [*begin, *end) of tensor p, along its first dimension, that this rank stores: its part of the
// arena range `owned` (the sharded optimizer's plan, which cuts tensors only between rows; a rank
// stores the weights and the optimizer state of what it updates). owned NULL: one rank holds all, and
// rank 0 stores every tensor whole. Loading reads any split of rows over any files.
static void checkpoint_owned_rows(const ParamInfo *p, const ArenaRange *owned, int rank, int64_t *begin,
                                  int64_t *end) {
  if (!owned) {
    *begin = 0;
    *end = rank == 0 ? p->shape[0] : 0;
    return;
  }
  size_t row = p->numel / (size_t)p->shape[0];
  size_t lo = p->offset > owned->begin ? p->offset : owned->begin;
  size_t hi = p->offset + p->numel < owned->end ? p->offset + p->numel : owned->end;
  if (hi <= lo) {
    *begin = *end = 0;
    return;
  }
  CHECK((lo - p->offset) % row == 0 && (hi - p->offset) % row == 0,
        "the owned range [%zu, %zu) cuts %s inside a row; the shard plan must cut between rows", owned->begin,
        owned->end, p->name);
  *begin = (int64_t)((lo - p->offset) / row);
  *end = (int64_t)((hi - p->offset) / row);
}

static size_t row_elements(const int64_t *shape, int ndim) {
  size_t n = 1;
  for (int d = 1; d < ndim; d++) n *= (size_t)shape[d];
  return n;
}

// ---------------------------------------------------------------------------------------------
// Writing

static void write_check(bool ok, const char *path, const char *what) {
  if (ok) return;
  h5io_unlock();
  remove(path);
  klt_user_error("could not %s in %s (is the disk full or the directory read-only?); free space and "
                 "save again", what, path);
}

// arenas[kind] holds arena elements from state_base[kind] on (the states: the owned range's start).
static void rank_file_write(const char *path, const ParamRegistry *params, const real *const arenas[KIND_COUNT],
                            const size_t state_base[KIND_COUNT], const ArenaRange *owned, int rank, int world_size,
                            long step, Progress *progress) {
  hid_t file_type = sizeof(real) == 4 ? H5T_IEEE_F32LE : H5T_IEEE_F64LE;
  hid_t memory_type = sizeof(real) == 4 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
  h5io_lock();
  h5io_silence_errors();
  hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  write_check(file >= 0, path, "create the file");
  int format_version = CHECKPOINT_FORMAT_VERSION;
  int64_t step64 = step;
  write_check(attribute_write(file, "format_version", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &format_version) >= 0 &&
              attribute_write(file, "rank", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &rank) >= 0 &&
              attribute_write(file, "world_size", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &world_size) >= 0 &&
              attribute_write(file, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, 0, &step64) >= 0,
              path, "write the file attributes");
  if (arenas[KIND_STATE1] || arenas[KIND_STATE2]) {
    hid_t group = H5Gcreate2(file, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    write_check(group >= 0, path, "create the optimizer group");
    H5Gclose(group);
  }
  for (int kind = 1; kind < KIND_COUNT; kind++) {
    if (!arenas[kind]) continue;
    hid_t group = H5Gcreate2(file, kind_group[kind], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    write_check(group >= 0, path, "create an optimizer state group");
    H5Gclose(group);
  }
  h5io_unlock();

  for (int kind = 0; kind < KIND_COUNT; kind++) {
    if (!arenas[kind]) continue;
    for (int i = 0; i < params->count; i++) {
      const ParamInfo *p = &params->params[i];
      int64_t begin, end;
      checkpoint_owned_rows(p, owned, rank, &begin, &end);
      if (end <= begin) continue;
      size_t per_row = row_elements(p->shape, p->ndim);
      const real *slice = arenas[kind] + (p->offset + (size_t)begin * per_row - state_base[kind]);  // (end - begin, shape[1:])
      size_t count = (size_t)(end - begin) * per_row;
      hsize_t dims[4];
      int64_t offset[4] = {begin, 0, 0, 0};
      dims[0] = (hsize_t)(end - begin);
      for (int d = 1; d < p->ndim; d++) dims[d] = (hsize_t)p->shape[d];
      uint32_t checksum = checkpoint_crc32(0, slice, count * sizeof(real));
      char name[160];
      snprintf(name, sizeof name, "%s%s", kind_prefix[kind], p->name);

      // One dataset per lock, so that the loader's read-ahead thread is not held up for the whole save.
      h5io_lock();
      hid_t space = H5Screate_simple(p->ndim, dims, NULL);
      hid_t dataset = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      H5Sclose(space);
      write_check(dataset >= 0, path, "create a dataset");
      bool ok = H5Dwrite(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, slice) >= 0 &&
                attribute_write(dataset, "global_shape", H5T_STD_I64LE, H5T_NATIVE_INT64, p->ndim, p->shape) >= 0 &&
                attribute_write(dataset, "offset", H5T_STD_I64LE, H5T_NATIVE_INT64, p->ndim, offset) >= 0 &&
                attribute_write(dataset, "checksum", H5T_STD_U32LE, H5T_NATIVE_UINT32, 0, &checksum) >= 0;
      H5Dclose(dataset);
      write_check(ok, path, "write a dataset");
      h5io_unlock();
      progress_add(progress, (double)(count * sizeof(real)));
    }
  }
  h5io_lock();
  write_check(H5Fclose(file) >= 0, path, "close the file");
  h5io_unlock();
  sync_path(path);
}

static void manifest_write(const char *path, const CheckpointMeta *meta, const char *config_text, int world_size,
                           int tensor_count, char (*rank_files)[RANK_FILE_NAME_CAP], const uint64_t *rank_bytes,
                           const uint32_t *rank_checksums) {
  h5io_lock();
  h5io_silence_errors();
  hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  write_check(file >= 0, path, "create the manifest");
  int format_version = CHECKPOINT_FORMAT_VERSION;
  int64_t step = meta->step, optimizer_step = meta->optimizer_step;
  int loader_stage = meta->loader.stage;
  const char *value_type = sizeof(real) == 4 ? "float32" : "float64";
  bool ok =
      attribute_write(file, "format_version", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &format_version) >= 0 &&
      attribute_write(file, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, 0, &step) >= 0 &&
      attribute_write(file, "tokens", H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 0, &meta->tokens) >= 0 &&
      attribute_write(file, "loader_stage", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &loader_stage) >= 0 &&
      attribute_write(file, "consumed_samples", H5T_STD_U64LE, H5T_NATIVE_UINT64, 0, &meta->loader.consumed_samples) >= 0 &&
      attribute_write(file, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, 0, &meta->loader.seed) >= 0 &&
      attribute_write(file, "optimizer_step", H5T_STD_I64LE, H5T_NATIVE_INT64, 0, &optimizer_step) >= 0 &&
      attribute_write(file, "world_size", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &world_size) >= 0 &&
      attribute_write(file, "tensor_count", H5T_STD_I32LE, H5T_NATIVE_INT, 0, &tensor_count) >= 0 &&
      attribute_write_string(file, "value_type", value_type) >= 0 &&
      attribute_write_string(file, "model_name", meta->model_name) >= 0;
  write_check(ok, path, "write the manifest attributes");

  // The config as one string dataset: attributes are limited to 64 KiB.
  const char *text = config_text ? config_text : "";
  hid_t string_type = H5Tcopy(H5T_C_S1);
  H5Tset_size(string_type, strlen(text) + 1);
  hid_t scalar = H5Screate(H5S_SCALAR);
  hid_t config = H5Dcreate2(file, "config", string_type, scalar, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  ok = config >= 0 && H5Dwrite(config, string_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, text) >= 0;
  if (config >= 0) H5Dclose(config);
  H5Sclose(scalar);
  H5Tclose(string_type);
  write_check(ok, path, "write the config");

  hsize_t dims[1] = {(hsize_t)world_size};
  hid_t space = H5Screate_simple(1, dims, NULL);
  hid_t name_type = H5Tcopy(H5T_C_S1);
  H5Tset_size(name_type, RANK_FILE_NAME_CAP);
  struct { const char *name; hid_t file_type, memory_type; const void *data; } lists[3] = {
      {"rank_files", name_type, name_type, rank_files},
      {"rank_file_bytes", H5T_STD_U64LE, H5T_NATIVE_UINT64, rank_bytes},
      {"rank_file_crc32", H5T_STD_U32LE, H5T_NATIVE_UINT32, rank_checksums},
  };
  for (int i = 0; i < 3; i++) {
    hid_t dataset = H5Dcreate2(file, lists[i].name, lists[i].file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ok = dataset >= 0 && H5Dwrite(dataset, lists[i].memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, lists[i].data) >= 0;
    if (dataset >= 0) H5Dclose(dataset);
    write_check(ok, path, "write the rank file list");
  }
  H5Tclose(name_type);
  H5Sclose(space);
  write_check(H5Fclose(file) >= 0, path, "close the manifest");
  h5io_unlock();
  sync_path(path);
}

// ---------------------------------------------------------------------------------------------
// The checkpoint directory

typedef enum { ENTRY_FINAL, ENTRY_PARTIAL, ENTRY_OLD } EntryKind;

typedef struct {
  long step;
  EntryKind kind;
  bool committed;  // has a manifest
  char name[64];
} DirectoryEntry;

// step_NNNNNNNN, step_NNNNNNNN.partial (being written) and step_NNNNNNNN.old (being replaced).
static bool entry_parse(const char *name, long *step, EntryKind *kind) {
  if (strncmp(name, "step_", 5) != 0) return false;
  const char *p = name + 5;
  if (*p < '0' || *p > '9') return false;
  char *end;
  *step = strtol(p, &end, 10);
  if (strcmp(end, "") == 0) *kind = ENTRY_FINAL;
  else if (strcmp(end, ".partial") == 0) *kind = ENTRY_PARTIAL;
  else if (strcmp(end, ".old") == 0) *kind = ENTRY_OLD;
  else return false;
  return strlen(name) < sizeof(((DirectoryEntry *)0)->name);
}

static bool directory_is_committed(const char *directory) {
  char manifest[PATH_CAP];
  path_join(manifest, directory, "manifest.h5");
  return path_exists(manifest);
}

static int entry_by_step_descending(const void *a, const void *b) {
  long x = ((const DirectoryEntry *)a)->step, y = ((const DirectoryEntry *)b)->step;
  return (x < y) - (x > y);
}

// The entries of ckpt_dir, newest step first; the count is returned, the array freed by the caller.
static int directory_scan(const char *ckpt_dir, DirectoryEntry **entries_out) {
  DirectoryEntry *entries = NULL;
  int count = 0, capacity = 0;
  DIR *directory = opendir(ckpt_dir);
  if (directory) {
    struct dirent *entry;
    while ((entry = readdir(directory)) != NULL) {
      DirectoryEntry e = {0};
      if (!entry_parse(entry->d_name, &e.step, &e.kind)) continue;
      snprintf(e.name, sizeof e.name, "%.63s", entry->d_name);
      char path[PATH_CAP];
      path_join(path, ckpt_dir, e.name);
      e.committed = directory_is_committed(path);
      if (count == capacity) {
        capacity = capacity ? 2 * capacity : 16;
        entries = klt_realloc(entries, (size_t)capacity * sizeof *entries);
      }
      entries[count++] = e;
    }
    closedir(directory);
  }
  if (count > 1) qsort(entries, (size_t)count, sizeof *entries, entry_by_step_descending);
  *entries_out = entries;
  return count;
}

static void latest_move(const char *ckpt_dir, const char *target_name) {
  char temporary[PATH_CAP], latest[PATH_CAP];
  path_join(temporary, ckpt_dir, "latest.tmp");
  path_join(latest, ckpt_dir, "latest");
  unlink(temporary);
  if (symlink(target_name, temporary) != 0 || rename(temporary, latest) != 0)
    klt_user_error("could not point %s at %s (%s); check that the directory is writable", latest, target_name,
                   strerror(errno));
  sync_path(ckpt_dir);
}

// Keeps the newest `keep` committed checkpoints up to the one just saved; older directories without a
// manifest are dead saves and go too. Higher steps are left alone (see checkpoint_save).
static void retention_apply(const char *ckpt_dir, long saved_step, int keep) {
  DirectoryEntry *entries;
  int count = directory_scan(ckpt_dir, &entries);
  int kept = 0;
  for (int i = 0; i < count; i++) {
    const DirectoryEntry *e = &entries[i];
    if (e->kind != ENTRY_FINAL || e->step > saved_step) continue;
    if (e->committed && (keep <= 0 || kept < keep)) {
      kept++;
      continue;
    }
    char path[PATH_CAP];
    path_join(path, ckpt_dir, e->name);
    remove_checkpoint_directory(path);
  }
  free(entries);
}

double checkpoint_save(const char *run_dir, const CheckpointMeta *meta, const ParamRegistry *params,
                       const real *state1, const real *state2, const ArenaRange *owned, const char *config_text,
                       int keep, const World *world) {
  double start = klt_now_seconds();
  int rank = world ? world->rank : 0, world_size = world ? world->size : 1;
  CHECK(meta->step >= 0 && params->values != NULL, "checkpoint_save needs a step >= 0 and allocated values");
  char ckpt_dir[PATH_CAP], final_dir[PATH_CAP], partial_dir[PATH_CAP], old_dir[PATH_CAP], name[64];
  path_join(ckpt_dir, run_dir, "ckpt");
  snprintf(name, sizeof name, "step_%08ld", meta->step);
  path_join(final_dir, ckpt_dir, name);
  path_suffix(partial_dir, final_dir, ".partial");
  path_suffix(old_dir, final_dir, ".old");

  if (rank == 0) {
    make_directories(ckpt_dir);
    // Leftovers of interrupted saves: nothing points at them.
    DirectoryEntry *entries;
    int count = directory_scan(ckpt_dir, &entries);
    for (int i = 0; i < count; i++) {
      if (entries[i].kind == ENTRY_FINAL) continue;
      char path[PATH_CAP];
      path_join(path, ckpt_dir, entries[i].name);
      remove_checkpoint_directory(path);
    }
    free(entries);
    if (mkdir(partial_dir, 0755) != 0)
      klt_user_error("could not create %s (%s); check that run_dir is writable", partial_dir, strerror(errno));
  }
  if (world) world_barrier(world);

  const real *const arenas[KIND_COUNT] = {params->values, state1, state2};
  const size_t base = owned ? owned->begin : 0, state_base[KIND_COUNT] = {0, base, base};
  double owned_bytes = 0;
  for (int i = 0; i < params->count; i++) {
    int64_t begin, end;
    checkpoint_owned_rows(&params->params[i], owned, rank, &begin, &end);
    size_t per_row = row_elements(params->params[i].shape, params->params[i].ndim);
    for (int kind = 0; kind < KIND_COUNT; kind++)
      if (arenas[kind]) owned_bytes += (double)((size_t)(end - begin) * per_row * sizeof(real));
  }
  Progress progress = progress_start("saving", final_dir, owned_bytes, rank == 0);
  char rank_name[RANK_FILE_NAME_CAP], rank_path[PATH_CAP], temporary_path[PATH_CAP];
  snprintf(rank_name, sizeof rank_name, "rank_%05d.h5", rank);
  path_join(rank_path, partial_dir, rank_name);
  path_suffix(temporary_path, rank_path, ".tmp");
  rank_file_write(temporary_path, params, arenas, state_base, owned, rank, world_size, meta->step, &progress);
  if (rename(temporary_path, rank_path) != 0)
    klt_user_error("could not rename %s to %s (%s)", temporary_path, rank_path, strerror(errno));
  if (world) world_barrier(world);

  if (rank == 0) {
    char (*rank_files)[RANK_FILE_NAME_CAP] = klt_calloc((size_t)world_size, RANK_FILE_NAME_CAP);
    uint64_t *rank_bytes = klt_calloc((size_t)world_size, sizeof(uint64_t));
    uint32_t *rank_checksums = klt_calloc((size_t)world_size, sizeof(uint32_t));
    double total_bytes = 0;
    for (int r = 0; r < world_size; r++) {
      snprintf(rank_files[r], RANK_FILE_NAME_CAP, "rank_%05d.h5", r);
      path_join(rank_path, partial_dir, rank_files[r]);
      if (!file_crc32(rank_path, &rank_checksums[r], &rank_bytes[r], NULL))
        klt_user_error("could not read back %s after writing it (%s); check the file system", rank_path,
                       strerror(errno));
      total_bytes += (double)rank_bytes[r];
    }
    char manifest_path[PATH_CAP];
    path_join(manifest_path, partial_dir, "manifest.h5");
    path_suffix(temporary_path, manifest_path, ".tmp");
    manifest_write(temporary_path, meta, config_text, world_size, params->count, rank_files, rank_bytes,
                   rank_checksums);
    if (rename(temporary_path, manifest_path) != 0)
      klt_user_error("could not rename %s to %s (%s)", temporary_path, manifest_path, strerror(errno));
    sync_path(partial_dir);

    // Commit: the complete directory takes its final name, replacing a checkpoint of the same step
    // (left from before a resume to an earlier one) only once the new one is whole.
    bool replacing = path_exists(final_dir);
    if (replacing && rename(final_dir, old_dir) != 0)
      klt_user_error("could not move %s aside (%s)", final_dir, strerror(errno));
    if (rename(partial_dir, final_dir) != 0)
      klt_user_error("could not rename %s to %s (%s)", partial_dir, final_dir, strerror(errno));
    sync_path(ckpt_dir);
    latest_move(ckpt_dir, name);
    if (replacing) remove_checkpoint_directory(old_dir);
    retention_apply(ckpt_dir, meta->step, keep);
    printf("checkpoint: saved step %ld to %s (%.1f MB in %d file%s) in %.2f s\n", meta->step, final_dir,
           total_bytes / 1e6, world_size, world_size == 1 ? "" : "s", klt_now_seconds() - start);
    fflush(stdout);
    free(rank_files);
    free(rank_bytes);
    free(rank_checksums);
  }
  if (world) world_barrier(world);
  return klt_now_seconds() - start;
}

bool checkpoint_find_latest(const char *run_dir, char *path_out, size_t cap) {
  char ckpt_dir[PATH_CAP], latest[PATH_CAP], target[64];
  path_join(ckpt_dir, run_dir, "ckpt");
  path_join(latest, ckpt_dir, "latest");
  long chosen = -1;
  ssize_t length = readlink(latest, target, sizeof target - 1);
  if (length > 0) {
    target[length] = '\0';
    long step;
    EntryKind kind;
    char target_path[PATH_CAP];
    path_join(target_path, ckpt_dir, target);
    if (entry_parse(target, &step, &kind) && kind == ENTRY_FINAL && directory_is_committed(target_path))
      chosen = step;
  }
  DirectoryEntry *entries;
  int count = directory_scan(ckpt_dir, &entries);
  for (int i = 0; chosen < 0 && i < count; i++)
    if (entries[i].kind == ENTRY_FINAL && entries[i].committed) chosen = entries[i].step;
  for (int i = 0; i < count; i++)
    if (!entries[i].committed && entries[i].kind != ENTRY_OLD && entries[i].step > chosen)
      printf("checkpoint: skipping %s/%s: it has no manifest (its save was interrupted)\n", ckpt_dir,
             entries[i].name);
  free(entries);
  if (chosen < 0) return false;
  int n = snprintf(path_out, cap, "%s/step_%08ld", ckpt_dir, chosen);
  CHECK(n > 0 && (size_t)n < cap, "checkpoint path buffer of %zu bytes is too small", cap);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reading: the manifest, the rank files and the stored slices

typedef struct {
  CheckpointMeta meta;
  int world_size;
  int tensor_count;
  char value_type[16];
  char (*rank_files)[RANK_FILE_NAME_CAP];  // (world_size,)
  uint64_t *rank_bytes;                    // (world_size,)
  uint32_t *rank_checksums;                // (world_size,)
} Manifest;

static void manifest_free(Manifest *manifest) {
  free(manifest->rank_files);
  free(manifest->rank_bytes);
  free(manifest->rank_checksums);
  memset(manifest, 0, sizeof *manifest);
}

static bool directory_has_rank_files(const char *path) {
  DIR *directory = opendir(path);
  if (!directory) return false;
  bool found = false;
  struct dirent *entry;
  while (!found && (entry = readdir(directory)) != NULL) found = strncmp(entry->d_name, "rank_", 5) == 0;
  closedir(directory);
  return found;
}

// Reads one of the manifest's per-rank lists, which must hold world_size entries.
static bool manifest_read_list(hid_t file, const char *name, hid_t memory_type, int world_size, void *out) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) return false;
  hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
  if (dataset < 0) return false;
  hid_t space = H5Dget_space(dataset);
  bool ok = H5Sget_simple_extent_npoints(space) == world_size &&
            H5Dread(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) >= 0;
  H5Sclose(space);
  H5Dclose(dataset);
  return ok;
}

static bool manifest_read(const char *path, Manifest *manifest, char *problem, size_t cap) {
  memset(manifest, 0, sizeof *manifest);
  struct stat info;
  if (stat(path, &info) != 0) return fail(problem, cap, "checkpoint %s does not exist", path);
  if (!S_ISDIR(info.st_mode))
    return fail(problem, cap, "%s is not a checkpoint directory (expected <run_dir>/ckpt/step_NNNNNNNN)", path);
  char manifest_path[PATH_CAP];
  path_join(manifest_path, path, "manifest.h5");
  if (!path_exists(manifest_path)) {
    if (directory_has_rank_files(path))
      return fail(problem, cap, "checkpoint %s has no manifest.h5: its save was interrupted, so it is incomplete; "
                  "use an earlier checkpoint (ckpt/latest points at the newest complete one)", path);
    return fail(problem, cap, "%s is not a checkpoint directory: it has no manifest.h5 (expected "
                "<run_dir>/ckpt/step_NNNNNNNN)", path);
  }
  h5io_lock();
  h5io_silence_errors();
  hid_t file = file_open_read(manifest_path);
  if (file < 0) {
    h5io_unlock();
    return fail(problem, cap, "manifest %s cannot be read as HDF5: it is corrupted; use an earlier checkpoint",
                manifest_path);
  }
  int format_version = 0, loader_stage = 0;
  int64_t step = 0, optimizer_step = 0;
  CheckpointMeta *meta = &manifest->meta;
  const char *missing = NULL;
  if (attribute_read(file, "format_version", H5T_NATIVE_INT, 0, &format_version) < 0) missing = "format_version";
  else if (attribute_read(file, "step", H5T_NATIVE_INT64, 0, &step) < 0) missing = "step";
  else if (attribute_read(file, "tokens", H5T_NATIVE_DOUBLE, 0, &meta->tokens) < 0) missing = "tokens";
  else if (attribute_read(file, "loader_stage", H5T_NATIVE_INT, 0, &loader_stage) < 0) missing = "loader_stage";
  else if (attribute_read(file, "consumed_samples", H5T_NATIVE_UINT64, 0, &meta->loader.consumed_samples) < 0)
    missing = "consumed_samples";
  else if (attribute_read(file, "seed", H5T_NATIVE_UINT64, 0, &meta->loader.seed) < 0) missing = "seed";
  else if (attribute_read(file, "optimizer_step", H5T_NATIVE_INT64, 0, &optimizer_step) < 0) missing = "optimizer_step";
  else if (attribute_read(file, "world_size", H5T_NATIVE_INT, 0, &manifest->world_size) < 0) missing = "world_size";
  else if (attribute_read(file, "tensor_count", H5T_NATIVE_INT, 0, &manifest->tensor_count) < 0) missing = "tensor_count";
  else if (!attribute_read_string(file, "value_type", manifest->value_type, sizeof manifest->value_type))
    missing = "value_type";
  else if (!attribute_read_string(file, "model_name", meta->model_name, sizeof meta->model_name))
    missing = "model_name";
  if (!missing && format_version != CHECKPOINT_FORMAT_VERSION) {
    H5Fclose(file);
    h5io_unlock();
    return fail(problem, cap, "manifest %s has format version %d; this klt reads version %d", manifest_path,
                format_version, CHECKPOINT_FORMAT_VERSION);
  }
  if (!missing && (manifest->world_size < 1 || manifest->world_size > 1 << 20)) missing = "a valid world_size";
  if (!missing) {
    int n = manifest->world_size;
    manifest->rank_files = klt_calloc((size_t)n, RANK_FILE_NAME_CAP);
    manifest->rank_bytes = klt_calloc((size_t)n, sizeof(uint64_t));
    manifest->rank_checksums = klt_calloc((size_t)n, sizeof(uint32_t));
    hid_t name_type = H5Tcopy(H5T_C_S1);
    H5Tset_size(name_type, RANK_FILE_NAME_CAP);
    if (!manifest_read_list(file, "rank_files", name_type, n, manifest->rank_files)) missing = "rank_files";
    else if (!manifest_read_list(file, "rank_file_bytes", H5T_NATIVE_UINT64, n, manifest->rank_bytes))
      missing = "rank_file_bytes";
    else if (!manifest_read_list(file, "rank_file_crc32", H5T_NATIVE_UINT32, n, manifest->rank_checksums))
      missing = "rank_file_crc32";
    H5Tclose(name_type);
  }
  H5Fclose(file);
  h5io_unlock();
  if (missing) {
    manifest_free(manifest);
    return fail(problem, cap, "manifest %s lacks %s: it is corrupted or not a klt checkpoint", manifest_path, missing);
  }
  for (int r = 0; r < manifest->world_size; r++) {
    manifest->rank_files[r][RANK_FILE_NAME_CAP - 1] = '\0';
    if (manifest->rank_files[r][0] == '\0' || strchr(manifest->rank_files[r], '/')) {
      manifest_free(manifest);
      return fail(problem, cap, "manifest %s names an invalid rank file: it is corrupted", manifest_path);
    }
  }
  meta->step = (long)step;
  meta->optimizer_step = (long)optimizer_step;
  meta->loader.stage = loader_stage;
  return true;
}

typedef struct {
  char name[160];  // path in the file: <tensor> or optimizer/stateK/<tensor>
  int kind;        // KIND_*
  int file;        // index into the manifest's rank files
  int ndim;
  int64_t global_shape[4], offset[4], shape[4];  // shape: of the stored slice
  size_t numel;                                  // of the slice
  size_t element_size;                           // 4 (float32) or 8 (float64)
  uint32_t checksum;
} StoredSlice;

typedef struct {
  StoredSlice *slices;
  int count, capacity;
} Inventory;

static const char *tensor_name(const StoredSlice *s) { return s->name + strlen(kind_prefix[s->kind]); }

// Describes the dataset `name` of `group` (attributes, shape, type) into slice; false with a problem.
static bool slice_describe(hid_t group, const char *name, StoredSlice *slice, const char *file_path, char *problem,
                           size_t cap) {
  hid_t dataset = H5Dopen2(group, name, H5P_DEFAULT);
  if (dataset < 0)
    return fail(problem, cap, "%s holds %s%s, which is not a dataset: the file is corrupted or not a klt checkpoint",
                file_path, kind_prefix[slice->kind], name);
  hid_t space = H5Dget_space(dataset);
  int ndim = H5Sget_simple_extent_ndims(space);
  hsize_t dims[4] = {0};
  if (ndim >= 1 && ndim <= 4) H5Sget_simple_extent_dims(space, dims, NULL);
  H5Sclose(space);
  hid_t type = H5Dget_type(dataset);
  bool is_float = H5Tget_class(type) == H5T_FLOAT;
  size_t element_size = H5Tget_size(type);
  H5Tclose(type);
  snprintf(slice->name, sizeof slice->name, "%s%s", kind_prefix[slice->kind], name);
  bool ok = ndim >= 1 && ndim <= 4 && is_float && (element_size == 4 || element_size == 8) &&
            attribute_read(dataset, "global_shape", H5T_NATIVE_INT64, ndim, slice->global_shape) == ndim &&
            attribute_read(dataset, "offset", H5T_NATIVE_INT64, ndim, slice->offset) == ndim &&
            attribute_read(dataset, "checksum", H5T_NATIVE_UINT32, 0, &slice->checksum) == 1;
  H5Dclose(dataset);
  if (!ok)
    return fail(problem, cap, "dataset %s of %s is not a float32/float64 tensor with global_shape, offset and "
                "checksum attributes: the file is corrupted or not a klt checkpoint", slice->name, file_path);
  slice->ndim = ndim;
  slice->element_size = element_size;
  slice->numel = 1;
  for (int d = 0; d < ndim; d++) {
    slice->shape[d] = (int64_t)dims[d];
    slice->numel *= (size_t)dims[d];
    bool inside = slice->global_shape[d] > 0 && slice->offset[d] >= 0 &&
                  slice->offset[d] + slice->shape[d] <= slice->global_shape[d];
    // Slices split the first dimension only.
    if (!inside || (d > 0 && (slice->offset[d] != 0 || slice->shape[d] != slice->global_shape[d])))
      return fail(problem, cap, "dataset %s of %s has a slice that does not fit its global shape: the file is "
                  "corrupted", slice->name, file_path);
  }
  return true;
}

static bool inventory_add_file(Inventory *inventory, const char *file_path, int file_index, long step,
                               char *problem, size_t cap) {
  h5io_lock();
  h5io_silence_errors();
  hid_t file = file_open_read(file_path);
  if (file < 0) {
    h5io_unlock();
    return fail(problem, cap, "rank file %s cannot be read as HDF5: it is corrupted or truncated; use an earlier "
                "checkpoint", file_path);
  }
  int64_t file_step = -1;
  if (attribute_read(file, "step", H5T_NATIVE_INT64, 0, &file_step) < 0 || file_step != step) {
    H5Fclose(file);
    h5io_unlock();
    return fail(problem, cap, "rank file %s belongs to step %lld, not to the manifest's step %ld: the directory mixes "
                "two checkpoints", file_path, (long long)file_step, step);
  }
  bool ok = true;
  for (int kind = 0; ok && kind < KIND_COUNT; kind++) {
    const char *group_name = kind_group[kind];
    if (kind > 0 && (H5Lexists(file, "optimizer", H5P_DEFAULT) <= 0 || H5Lexists(file, group_name, H5P_DEFAULT) <= 0))
      continue;
    hid_t group = H5Gopen2(file, group_name, H5P_DEFAULT);
    H5G_info_t info;
    if (group < 0 || H5Gget_info(group, &info) < 0) {
      ok = fail(problem, cap, "group %s of %s cannot be read: the file is corrupted", group_name, file_path);
      break;
    }
    for (hsize_t i = 0; ok && i < info.nlinks; i++) {
      char name[160];
      ssize_t length = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT);
      if (length < 0 || (size_t)length >= sizeof name) {
        ok = fail(problem, cap, "group %s of %s has an unreadable or overlong name: the file is corrupted",
                  group_name, file_path);
        break;
      }
      if (kind == 0 && strcmp(name, "optimizer") == 0) continue;
      if (inventory->count == inventory->capacity) {
        inventory->capacity = inventory->capacity ? 2 * inventory->capacity : 256;
        inventory->slices = klt_realloc(inventory->slices, (size_t)inventory->capacity * sizeof(StoredSlice));
      }
      StoredSlice *slice = &inventory->slices[inventory->count];
      memset(slice, 0, sizeof *slice);
      slice->kind = kind;
      slice->file = file_index;
      ok = slice_describe(group, name, slice, file_path, problem, cap);
      if (ok) inventory->count++;
    }
  }
  H5Fclose(file);
  h5io_unlock();
  return ok;
}

static int slice_by_name_then_offset(const void *a, const void *b) {
  const StoredSlice *x = a, *y = b;
  int c = strcmp(x->name, y->name);
  if (c != 0) return c;
  return (x->offset[0] > y->offset[0]) - (x->offset[0] < y->offset[0]);
}

// Index of the first slice named `name` in the sorted inventory, or -1.
static int inventory_find(const Inventory *inventory, const char *name) {
  int low = 0, high = inventory->count;
  while (low < high) {
    int middle = (low + high) / 2;
    if (strcmp(inventory->slices[middle].name, name) < 0) low = middle + 1;
    else high = middle;
  }
  return low < inventory->count && strcmp(inventory->slices[low].name, name) == 0 ? low : -1;
}

static void shape_format(char *out, size_t cap, const int64_t *shape, int ndim) {
  int n = snprintf(out, cap, "(");
  for (int d = 0; d < ndim && n > 0 && (size_t)n < cap; d++)
    n += snprintf(out + n, cap - (size_t)n, "%s%lld", d ? ", " : "", (long long)shape[d]);
  if (n > 0 && (size_t)n < cap) snprintf(out + n, cap - (size_t)n, ")");
}

// The slices of one tensor, from index `first` of the sorted inventory: same global shape, rows
// covering [0, rows) once. Returns the index after them, or -1 with a problem.
static int slices_check_cover(const Inventory *inventory, int first, const char *path, char *problem, size_t cap) {
  const StoredSlice *head = &inventory->slices[first];
  int64_t next_row = 0;
  int i = first;
  for (; i < inventory->count && strcmp(inventory->slices[i].name, head->name) == 0; i++) {
    const StoredSlice *s = &inventory->slices[i];
    bool same = s->ndim == head->ndim;
    for (int d = 0; same && d < s->ndim; d++) same = s->global_shape[d] == head->global_shape[d];
    if (!same) {
      fail(problem, cap, "checkpoint %s stores slices of %s with different global shapes: it is corrupted", path,
           head->name);
      return -1;
    }
    if (s->offset[0] != next_row) {
      fail(problem, cap, "checkpoint %s stores rows of %s %s (at row %lld): it is corrupted or incomplete", path,
           head->name, s->offset[0] > next_row ? "with a gap" : "twice", (long long)next_row);
      return -1;
    }
    next_row += s->shape[0];
  }
  if (next_row != head->global_shape[0]) {
    fail(problem, cap, "checkpoint %s lacks rows %lld.. of %s: it is incomplete", path, (long long)next_row,
         head->name);
    return -1;
  }
  return i;
}

// Reads one slice into buffer (numel elements of its stored type) and checks its checksum.
static bool slice_read(hid_t file, const StoredSlice *slice, void *buffer, const char *file_path, char *problem,
                       size_t cap) {
  hid_t memory_type = slice->element_size == 4 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE;
  hid_t dataset = H5Dopen2(file, slice->name, H5P_DEFAULT);
  bool read = dataset >= 0 && H5Dread(dataset, memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buffer) >= 0;
  if (dataset >= 0) H5Dclose(dataset);
  if (!read)
    return fail(problem, cap, "dataset %s of %s cannot be read: the file is corrupted or truncated; use an earlier "
                "checkpoint", slice->name, file_path);
  if (checkpoint_crc32(0, buffer, slice->numel * slice->element_size) != slice->checksum)
    return fail(problem, cap, "dataset %s of %s fails its checksum: the file is corrupted; use an earlier checkpoint",
                slice->name, file_path);
  return true;
}

// Reads and checks every slice of one rank file; false names the first that fails.
static bool rank_file_check_slices(const Inventory *inventory, int file_index, const char *file_path, char *problem,
                                   size_t cap) {
  h5io_lock();
  h5io_silence_errors();
  hid_t file = file_open_read(file_path);
  bool ok = file >= 0 || fail(problem, cap, "rank file %s cannot be read as HDF5: it is corrupted or truncated",
                              file_path);
  void *buffer = NULL;
  size_t buffer_bytes = 0;
  for (int i = 0; ok && i < inventory->count; i++) {
    const StoredSlice *s = &inventory->slices[i];
    if (s->file != file_index) continue;
    size_t bytes = s->numel * s->element_size;
    if (bytes > buffer_bytes) {
      buffer = klt_realloc(buffer, bytes);
      buffer_bytes = bytes;
    }
    ok = slice_read(file, s, buffer, file_path, problem, cap);
  }
  if (file >= 0) H5Fclose(file);
  h5io_unlock();
  free(buffer);
  return ok;
}

// The rank files against the manifest: present, of the recorded size and, with whole_file_checksums,
// of the recorded CRC-32 (a mismatch is pinned to the first dataset that fails its own checksum).
static bool rank_files_check(const char *path, const Manifest *manifest, bool whole_file_checksums,
                             Progress *progress, char *problem, size_t cap) {
  for (int r = 0; r < manifest->world_size; r++) {
    char file_path[PATH_CAP];
    path_join(file_path, path, manifest->rank_files[r]);
    struct stat info;
    if (stat(file_path, &info) != 0)
      return fail(problem, cap, "rank file %s is missing (the manifest lists %d rank file%s): the checkpoint is "
                  "incomplete; use an earlier checkpoint", file_path, manifest->world_size,
                  manifest->world_size == 1 ? "" : "s");
    if ((uint64_t)info.st_size != manifest->rank_bytes[r])
      return fail(problem, cap, "rank file %s has %lld bytes but the manifest says %llu: it is truncated or "
                  "corrupted; use an earlier checkpoint", file_path, (long long)info.st_size,
                  (unsigned long long)manifest->rank_bytes[r]);
    if (!whole_file_checksums) continue;
    uint32_t crc;
    uint64_t bytes;
    if (!file_crc32(file_path, &crc, &bytes, progress))
      return fail(problem, cap, "rank file %s cannot be read (%s)", file_path, strerror(errno));
    if (crc == manifest->rank_checksums[r]) continue;
    Inventory inventory = {0};
    bool described = inventory_add_file(&inventory, file_path, r, manifest->meta.step, problem, cap);
    bool slices_ok = described && rank_file_check_slices(&inventory, r, file_path, problem, cap);
    free(inventory.slices);
    if (slices_ok)
      fail(problem, cap, "rank file %s fails its checksum (CRC-32 %08x, the manifest says %08x) outside the "
           "tensor data: the file is corrupted; use an earlier checkpoint", file_path, crc,
           manifest->rank_checksums[r]);
    return false;
  }
  return true;
}

static bool inventory_build(const char *path, const Manifest *manifest, Inventory *inventory, char *problem,
                            size_t cap) {
  memset(inventory, 0, sizeof *inventory);
  for (int r = 0; r < manifest->world_size; r++) {
    char file_path[PATH_CAP];
    path_join(file_path, path, manifest->rank_files[r]);
    if (!inventory_add_file(inventory, file_path, r, manifest->meta.step, problem, cap)) return false;
  }
  if (inventory->count > 1)
    qsort(inventory->slices, (size_t)inventory->count, sizeof(StoredSlice), slice_by_name_then_offset);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Loading

// Every tensor of the registry (and, for kinds 1 and 2, its optimizer state) is stored whole with the
// registry's shape, and the checkpoint has no tensor the registry lacks.
static bool inventory_match_registry(const Inventory *inventory, const ParamRegistry *params, const bool wanted[KIND_COUNT],
                                     const char *path, char *problem, size_t cap) {
  for (int kind = 0; kind < KIND_COUNT; kind++) {
    if (!wanted[kind]) continue;
    for (int i = 0; i < params->count; i++) {
      const ParamInfo *p = &params->params[i];
      char name[160];
      snprintf(name, sizeof name, "%s%s", kind_prefix[kind], p->name);
      int first = inventory_find(inventory, name);
      if (first < 0 && kind == KIND_VALUES)
        return fail(problem, cap, "checkpoint %s has no tensor %s: it was saved from another model (compare its "
                    "[model] config, shown by klt-ckpt inspect, with yours)", path, p->name);
      if (first < 0)
        return fail(problem, cap, "checkpoint %s has no optimizer state for %s; load it as weights only ([stage] "
                    "init_from) or resume from a checkpoint saved with optimizer state", path, p->name);
      const StoredSlice *s = &inventory->slices[first];
      bool same = s->ndim == p->ndim;
      for (int d = 0; same && d < p->ndim; d++) same = s->global_shape[d] == p->shape[d];
      if (!same) {
        char stored[96], expected[96];
        shape_format(stored, sizeof stored, s->global_shape, s->ndim);
        shape_format(expected, sizeof expected, p->shape, p->ndim);
        return fail(problem, cap, "tensor %s has shape %s in checkpoint %s but %s in this model: the checkpoint is "
                    "of another model shape", s->name, stored, path, expected);
      }
      if (slices_check_cover(inventory, first, path, problem, cap) < 0) return false;
    }
  }
  for (int i = 0; i < inventory->count; i++) {
    const StoredSlice *s = &inventory->slices[i];
    if (i > 0 && strcmp(s->name, inventory->slices[i - 1].name) == 0) continue;
    if (params_find(params, tensor_name(s)) < 0)
      return fail(problem, cap, "checkpoint %s has tensor %s, which this model does not have: it was saved from "
                  "another model", path, s->name);
  }
  return true;
}

static void load_fail(Inventory *inventory, Manifest *manifest, const char *problem) {
  free(inventory->slices);
  manifest_free(manifest);
  klt_user_error("%s", problem);
}

void checkpoint_load(const char *path, CheckpointMeta *meta, ParamRegistry *params, real *state1, real *state2,
                     const ArenaRange *state_range, bool report_progress) {
  CHECK(params->values != NULL, "checkpoint_load needs allocated parameter values");
  CHECK(!state_range || (state_range->begin <= state_range->end && state_range->end <= params->total),
        "checkpoint_load: state range [%zu, %zu) outside the arena of %zu", state_range->begin, state_range->end,
        params->total);
  char problem[PROBLEM_CAP];
  Manifest manifest;
  Inventory inventory = {0};
  if (!manifest_read(path, &manifest, problem, sizeof problem)) klt_user_error("%s", problem);
  real *const arenas[KIND_COUNT] = {params->values, state1, state2};
  const bool wanted[KIND_COUNT] = {true, state1 != NULL, state2 != NULL};
  // The weights are loaded whole; the states only in the window [window[0], window[1]) of the arena.
  const size_t window[2] = {state_range ? state_range->begin : 0, state_range ? state_range->end : params->total};

  double file_bytes = 0;
  for (int r = 0; r < manifest.world_size; r++) file_bytes += (double)manifest.rank_bytes[r];
  Progress progress = progress_start("loading", path, 2 * file_bytes, report_progress);
  if (!rank_files_check(path, &manifest, true, &progress, problem, sizeof problem) ||
      !inventory_build(path, &manifest, &inventory, problem, sizeof problem) ||
      !inventory_match_registry(&inventory, params, wanted, path, problem, sizeof problem))
    load_fail(&inventory, &manifest, problem);

  void *buffer = NULL;  // slices stored in the other precision, or only partly wanted, pass through it
  size_t buffer_bytes = 0;
  for (int r = 0; r < manifest.world_size; r++) {
    char file_path[PATH_CAP];
    path_join(file_path, path, manifest.rank_files[r]);
    h5io_lock();
    h5io_silence_errors();
    hid_t file = file_open_read(file_path);
    bool ok = file >= 0 || fail(problem, sizeof problem, "rank file %s cannot be read as HDF5: it is corrupted",
                                file_path);
    for (int i = 0; ok && i < inventory.count; i++) {
      const StoredSlice *s = &inventory.slices[i];
      if (s->file != r || !wanted[s->kind]) continue;
      progress_add(&progress, (double)(s->numel * s->element_size));
      const ParamInfo *p = &params->params[params_find(params, tensor_name(s))];
      // Arena elements [first, first + numel) stored; [lo, hi) of them wanted, at arenas[kind][lo - base].
      const size_t first = p->offset + (size_t)s->offset[0] * row_elements(p->shape, p->ndim);
      size_t lo = first, hi = first + s->numel, base = 0;
      if (s->kind != KIND_VALUES) {
        base = window[0];
        if (lo < window[0]) lo = window[0];
        if (hi > window[1]) hi = window[1];
        if (hi <= lo) continue;
      }
      real *destination = arenas[s->kind] + (lo - base);
      if (s->element_size == sizeof(real) && lo == first && hi == first + s->numel) {
        ok = slice_read(file, s, destination, file_path, problem, sizeof problem);
      } else {
        size_t bytes = s->numel * s->element_size;
        if (bytes > buffer_bytes) {
          buffer = klt_realloc(buffer, bytes);
          buffer_bytes = bytes;
        }
        ok = slice_read(file, s, buffer, file_path, problem, sizeof problem);
        for (size_t j = lo - first; ok && j < hi - first; j++)
          destination[j - (lo - first)] =
              s->element_size == 4 ? (real)((const float *)buffer)[j] : (real)((const double *)buffer)[j];
      }
    }
    if (file >= 0) H5Fclose(file);
    h5io_unlock();
    if (!ok) {
      free(buffer);
      load_fail(&inventory, &manifest, problem);
    }
  }
  free(buffer);
  *meta = manifest.meta;
  if (report_progress && klt_now_seconds() - progress.start > 1) {
    printf("checkpoint: loaded %s in %.1f s\n", path, klt_now_seconds() - progress.start);
    fflush(stdout);
  }
  free(inventory.slices);
  manifest_free(&manifest);
}

char *checkpoint_read_config(const char *path) {
  char problem[PROBLEM_CAP], manifest_path[PATH_CAP];
  Manifest manifest;
  if (!manifest_read(path, &manifest, problem, sizeof problem)) klt_user_error("%s", problem);
  manifest_free(&manifest);
  path_join(manifest_path, path, "manifest.h5");
  h5io_lock();
  h5io_silence_errors();
  hid_t file = file_open_read(manifest_path);
  hid_t dataset = file >= 0 ? H5Dopen2(file, "config", H5P_DEFAULT) : -1;
  hid_t type = dataset >= 0 ? H5Dget_type(dataset) : -1;
  char *text = NULL;
  if (type >= 0 && H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type)) {
    size_t size = H5Tget_size(type);
    text = klt_calloc(size + 1, 1);
    if (H5Dread(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, text) < 0) {
      free(text);
      text = NULL;
    }
  }
  if (type >= 0) H5Tclose(type);
  if (file >= 0) H5Fclose(file);
  h5io_unlock();
  if (!text) klt_user_error("manifest %s has no readable config: it is corrupted", manifest_path);
  return text;
}

// ---------------------------------------------------------------------------------------------
// Checking without a model (klt-ckpt)

static void listing_write(FILE *out, const char *path, const Manifest *manifest, const Inventory *inventory) {
  const CheckpointMeta *m = &manifest->meta;
  fprintf(out, "checkpoint %s\n", path);
  fprintf(out, "  model %s, step %ld, %.0f tokens, optimizer step %ld\n", m->model_name, m->step, m->tokens,
          m->optimizer_step);
  fprintf(out, "  loader: stage %d, consumed samples %llu, seed %llu\n", m->loader.stage,
          (unsigned long long)m->loader.consumed_samples, (unsigned long long)m->loader.seed);
  fprintf(out, "  values stored as %s, saved by %d rank%s:\n", manifest->value_type, manifest->world_size,
          manifest->world_size == 1 ? "" : "s");
  for (int r = 0; r < manifest->world_size; r++)
    fprintf(out, "    %s  %.3f MB  crc32 %08x\n", manifest->rank_files[r], (double)manifest->rank_bytes[r] / 1e6,
            manifest->rank_checksums[r]);
  int counts[KIND_COUNT] = {0};
  double elements[KIND_COUNT] = {0}, bytes = 0;
  fprintf(out, "  tensors (name, global shape, slices):\n");
  for (int i = 0; i < inventory->count;) {
    const StoredSlice *s = &inventory->slices[i];
    int slices = 0;
    for (; i < inventory->count && strcmp(inventory->slices[i].name, s->name) == 0; i++) {
      slices++;
      bytes += (double)(inventory->slices[i].numel * inventory->slices[i].element_size);
      elements[s->kind] += (double)inventory->slices[i].numel;
    }
    counts[s->kind]++;
    if (s->kind != KIND_VALUES) continue;
    char shape[96];
    shape_format(shape, sizeof shape, s->global_shape, s->ndim);
    fprintf(out, "    %-64s %-24s %d\n", s->name, shape, slices);
  }
  fprintf(out, "  %d tensors, %.0f parameters; optimizer state1 for %d tensors, state2 for %d; %.3f MB of tensor "
          "data\n", counts[KIND_VALUES], elements[KIND_VALUES], counts[KIND_STATE1], counts[KIND_STATE2], bytes / 1e6);
}

bool checkpoint_check(const char *path, bool verify_checksums, FILE *listing, char *problem, size_t cap) {
  Manifest manifest;
  if (!manifest_read(path, &manifest, problem, cap)) return false;
  Inventory inventory = {0};
  bool ok = rank_files_check(path, &manifest, verify_checksums, NULL, problem, cap) &&
            inventory_build(path, &manifest, &inventory, problem, cap);
  if (ok && listing) listing_write(listing, path, &manifest, &inventory);
  int tensors = 0;
  for (int i = 0; ok && i < inventory.count;) {
    const StoredSlice *s = &inventory.slices[i];
    if (s->kind == KIND_VALUES) tensors++;
    else {
      int values = inventory_find(&inventory, tensor_name(s));
      bool same = values >= 0 && inventory.slices[values].ndim == s->ndim;
      for (int d = 0; same && d < s->ndim; d++) same = inventory.slices[values].global_shape[d] == s->global_shape[d];
      if (!same) {
        ok = fail(problem, cap, "checkpoint %s has optimizer state %s without a tensor of its shape: it is corrupted",
                  path, s->name);
        break;
      }
    }
    i = slices_check_cover(&inventory, i, path, problem, cap);
    ok = i >= 0;
  }
  if (ok && tensors != manifest.tensor_count)
    ok = fail(problem, cap, "checkpoint %s holds %d tensors but its manifest says %d: it is incomplete", path, tensors,
              manifest.tensor_count);
  for (int r = 0; ok && verify_checksums && r < manifest.world_size; r++) {
    char file_path[PATH_CAP];
    path_join(file_path, path, manifest.rank_files[r]);
    ok = rank_file_check_slices(&inventory, r, file_path, problem, cap);
  }
  free(inventory.slices);
  manifest_free(&manifest);
  return ok;
}
