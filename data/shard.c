// HDF5 token shards: writing, structural checks and stream reads; see shard.h for the format.
#include "data/shard.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"
#include "data/h5io.h"

// Every failure below is reported by klt itself (see h5io.h); the lock is released first so that
// nothing waits on it while the process exits.
static void shard_fail(void) { h5io_unlock(); }

// ---------------------------------------------------------------------------------------------
// Writing

struct ShardWriter {
  char *path;
  char *temporary_path;
  hid_t file;
  hid_t tokens;     // (written,) uint32, grows by whole buffers
  hid_t loss_mask;  // (written,) uint8, or H5I_INVALID_HID
  uint64_t vocab_size;
  char *tokenizer;
  uint32_t *token_buffer;  // (SHARD_CHUNK_TOKENS,) tokens appended but not yet written
  uint8_t *mask_buffer;    // (SHARD_CHUNK_TOKENS,) or NULL
  size_t buffered;
  uint64_t written;
  uint64_t *doc_offsets;  // (doc_count,)
  size_t doc_count, doc_capacity;
};

static void writer_check(ShardWriter *writer, herr_t status, const char *what) {
  if (status >= 0) return;
  shard_fail();
  remove(writer->temporary_path);
  klt_user_error("could not %s in %s (is the disk full or the directory read-only?); free space and "
                 "run the command again", what, writer->temporary_path);
}

static hid_t writer_create_dataset(ShardWriter *writer, const char *name, hid_t file_type,
                                   int deflate_level) {
  hsize_t dims[1] = {0}, max_dims[1] = {H5S_UNLIMITED}, chunk[1] = {SHARD_CHUNK_TOKENS};
  hid_t space = H5Screate_simple(1, dims, max_dims);
  hid_t properties = H5Pcreate(H5P_DATASET_CREATE);
  H5Pset_chunk(properties, 1, chunk);
  if (deflate_level > 0) H5Pset_deflate(properties, (unsigned)deflate_level);
  hid_t dataset = H5Dcreate2(writer->file, name, file_type, space, H5P_DEFAULT, properties, H5P_DEFAULT);
  H5Pclose(properties);
  H5Sclose(space);
  writer_check(writer, dataset < 0 ? -1 : 0, "create a dataset");
  return dataset;
}

ShardWriter *shard_writer_create(const char *path, uint64_t vocab_size, const char *tokenizer,
                                 int deflate_level, int with_loss_mask) {
  CHECK(deflate_level >= 0 && deflate_level <= 9, "deflate level %d", deflate_level);
  CHECK(vocab_size > 0 && tokenizer != NULL && strlen(tokenizer) < SHARD_TOKENIZER_NAME_MAX,
        "bad shard vocabulary or tokenizer");
  ShardWriter *writer = klt_calloc(1, sizeof(ShardWriter));
  writer->path = klt_strdup(path);
  writer->temporary_path = klt_malloc(strlen(path) + 5);
  sprintf(writer->temporary_path, "%s.tmp", path);
  writer->vocab_size = vocab_size;
  writer->tokenizer = klt_strdup(tokenizer);
  writer->token_buffer = klt_malloc(SHARD_CHUNK_TOKENS * sizeof(uint32_t));
  writer->mask_buffer = with_loss_mask ? klt_malloc(SHARD_CHUNK_TOKENS) : NULL;
  writer->loss_mask = H5I_INVALID_HID;
  h5io_lock();
  h5io_silence_errors();
  writer->file = H5Fcreate(writer->temporary_path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (writer->file < 0) {
    shard_fail();
    klt_user_error("could not create %s; check that the output directory exists and is writable",
                   writer->temporary_path);
  }
  writer->tokens = writer_create_dataset(writer, "tokens", H5T_STD_U32LE, deflate_level);
  if (with_loss_mask) writer->loss_mask = writer_create_dataset(writer, "loss_mask", H5T_STD_U8LE, deflate_level);
  h5io_unlock();
  return writer;
}

void shard_writer_begin_document(ShardWriter *writer) {
  uint64_t offset = shard_writer_token_count(writer);
  if (writer->doc_count > 0 && writer->doc_offsets[writer->doc_count - 1] == offset) return;  // empty document
  if (writer->doc_count == writer->doc_capacity) {
    writer->doc_capacity = writer->doc_capacity ? 2 * writer->doc_capacity : 1024;
    writer->doc_offsets = klt_realloc(writer->doc_offsets, writer->doc_capacity * sizeof(uint64_t));
  }
  writer->doc_offsets[writer->doc_count++] = offset;
}

static void writer_append_block(ShardWriter *writer, hid_t dataset, hid_t memory_type, const void *data,
                                uint64_t start, size_t count) {
  hsize_t new_size[1] = {start + count}, offset[1] = {start}, length[1] = {count};
  writer_check(writer, H5Dset_extent(dataset, new_size), "extend a dataset");
  hid_t file_space = H5Dget_space(dataset);
  hid_t memory_space = H5Screate_simple(1, length, NULL);
  H5Sselect_hyperslab(file_space, H5S_SELECT_SET, offset, NULL, length, NULL);
  herr_t status = H5Dwrite(dataset, memory_type, memory_space, file_space, H5P_DEFAULT, data);
  H5Sclose(memory_space);
  H5Sclose(file_space);
  writer_check(writer, status, "write tokens");
}

static void writer_flush(ShardWriter *writer) {
  if (writer->buffered == 0) return;
  h5io_lock();
  writer_append_block(writer, writer->tokens, H5T_NATIVE_UINT32, writer->token_buffer, writer->written,
                      writer->buffered);
  if (writer->mask_buffer)
    writer_append_block(writer, writer->loss_mask, H5T_NATIVE_UINT8, writer->mask_buffer, writer->written,
                        writer->buffered);
  h5io_unlock();
  writer->written += writer->buffered;
  writer->buffered = 0;
}

void shard_writer_append(ShardWriter *writer, const uint32_t *tokens, const uint8_t *loss_mask,
                         size_t count) {
  CHECK((loss_mask != NULL) == (writer->mask_buffer != NULL), "loss mask given to a shard %s one",
        writer->mask_buffer ? "that needs" : "without");
  while (count > 0) {
    size_t take = SHARD_CHUNK_TOKENS - writer->buffered;
    if (take > count) take = count;
    memcpy(writer->token_buffer + writer->buffered, tokens, take * sizeof(uint32_t));
    if (loss_mask) {
      memcpy(writer->mask_buffer + writer->buffered, loss_mask, take);
      loss_mask += take;
    }
    writer->buffered += take;
    tokens += take;
    count -= take;
    if (writer->buffered == SHARD_CHUNK_TOKENS) writer_flush(writer);
  }
}

uint64_t shard_writer_token_count(const ShardWriter *writer) { return writer->written + writer->buffered; }
uint64_t shard_writer_document_count(const ShardWriter *writer) { return writer->doc_count; }

static void writer_set_attribute(ShardWriter *writer, const char *name, hid_t file_type, hid_t memory_type,
                                 const void *value) {
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(writer->file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
  herr_t status = attribute < 0 ? -1 : H5Awrite(attribute, memory_type, value);
  if (attribute >= 0) H5Aclose(attribute);
  H5Sclose(space);
  writer_check(writer, status, "write an attribute");
}

void shard_writer_close(ShardWriter *writer) {
  writer_flush(writer);
  CHECK(writer->written > 0, "empty shard %s", writer->path);
  CHECK(writer->doc_count > 0 && writer->doc_offsets[0] == 0, "shard %s does not begin a document",
        writer->path);
  h5io_lock();
  hsize_t doc_dims[1] = {writer->doc_count};
  hid_t space = H5Screate_simple(1, doc_dims, NULL);
  hid_t offsets = H5Dcreate2(writer->file, "doc_offsets", H5T_STD_U64LE, space, H5P_DEFAULT, H5P_DEFAULT,
                             H5P_DEFAULT);
  herr_t status = offsets < 0 ? -1 : H5Dwrite(offsets, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                                              writer->doc_offsets);
  if (offsets >= 0) H5Dclose(offsets);
  H5Sclose(space);
  writer_check(writer, status, "write doc_offsets");

  int format_version = SHARD_FORMAT_VERSION;
  writer_set_attribute(writer, "format_version", H5T_STD_I32LE, H5T_NATIVE_INT, &format_version);
  writer_set_attribute(writer, "vocab_size", H5T_STD_U64LE, H5T_NATIVE_UINT64, &writer->vocab_size);
  writer_set_attribute(writer, "token_count", H5T_STD_U64LE, H5T_NATIVE_UINT64, &writer->written);
  hid_t string_type = H5Tcopy(H5T_C_S1);
  H5Tset_size(string_type, strlen(writer->tokenizer) + 1);
  H5Tset_strpad(string_type, H5T_STR_NULLTERM);
  writer_set_attribute(writer, "tokenizer", string_type, string_type, writer->tokenizer);
  H5Tclose(string_type);

  H5Dclose(writer->tokens);
  if (writer->loss_mask >= 0) H5Dclose(writer->loss_mask);
  writer_check(writer, H5Fclose(writer->file), "close the file");
  h5io_unlock();
  if (rename(writer->temporary_path, writer->path) != 0)
    klt_user_error("could not rename %s to %s (%s); check the output directory", writer->temporary_path,
                   writer->path, strerror(errno));
  free(writer->path);
  free(writer->temporary_path);
  free(writer->tokenizer);
  free(writer->token_buffer);
  free(writer->mask_buffer);
  free(writer->doc_offsets);
  free(writer);
}

// ---------------------------------------------------------------------------------------------
// Reading

#define REMAKE_HINT "re-create the dataset with klt-data prep"

static void require_attribute(const char *path, hid_t file, const char *name) {
  if (H5Aexists(file, name) > 0) return;
  shard_fail();
  klt_user_error("shard %s has no '%s' attribute, so it was not written by klt-data; " REMAKE_HINT,
                 path, name);
}

static uint64_t read_integer_attribute(const char *path, hid_t file, const char *name, int is_signed) {
  require_attribute(path, file, name);
  hid_t attribute = H5Aopen(file, name, H5P_DEFAULT);
  hid_t type = H5Aget_type(attribute);
  uint64_t value = 0;
  herr_t status = -1;
  if (H5Tget_class(type) == H5T_INTEGER)
    status = H5Aread(attribute, is_signed ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT64, &value);
  H5Tclose(type);
  H5Aclose(attribute);
  if (status < 0) {
    shard_fail();
    klt_user_error("attribute '%s' of shard %s is not an integer; " REMAKE_HINT, name, path);
  }
  return value;
}

static void read_string_attribute(const char *path, hid_t file, const char *name, char *out, size_t capacity) {
  require_attribute(path, file, name);
  hid_t attribute = H5Aopen(file, name, H5P_DEFAULT);
  hid_t type = H5Aget_type(attribute);
  herr_t status = -1;
  out[0] = 0;
  if (H5Tget_class(type) == H5T_STRING) {
    hid_t memory_type = H5Tcopy(H5T_C_S1);
    if (H5Tis_variable_str(type) > 0) {
      char *value = NULL;
      H5Tset_size(memory_type, H5T_VARIABLE);
      status = H5Aread(attribute, memory_type, &value);
      if (status >= 0 && value) {
        snprintf(out, capacity, "%s", value);
        H5free_memory(value);
      }
    } else {
      size_t size = H5Tget_size(type);
      char *value = klt_calloc(size + 1, 1);
      H5Tset_size(memory_type, size + 1);
      status = H5Aread(attribute, memory_type, value);
      snprintf(out, capacity, "%s", value);
      free(value);
    }
    H5Tclose(memory_type);
  }
  H5Tclose(type);
  H5Aclose(attribute);
  if (status < 0) {
    shard_fail();
    klt_user_error("attribute '%s' of shard %s is not a string; " REMAKE_HINT, name, path);
  }
}

// Opens a 1-D unsigned integer dataset of the given element size and returns it and its length.
static hid_t open_vector(const char *path, hid_t file, const char *name, size_t element_size,
                         const char *dtype_name, uint64_t *length) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) {
    shard_fail();
    klt_user_error("shard %s has no '%s' dataset; " REMAKE_HINT, path, name);
  }
  hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
  if (dataset < 0) {
    shard_fail();
    klt_user_error("'%s' in shard %s is not a dataset; " REMAKE_HINT, name, path);
  }
  hid_t type = H5Dget_type(dataset);
  int type_ok = H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == element_size &&
                H5Tget_sign(type) == H5T_SGN_NONE;
  H5Tclose(type);
  if (!type_ok) {
    shard_fail();
    klt_user_error("dataset '%s' in shard %s has the wrong dtype (it must be %s); " REMAKE_HINT, name,
                   path, dtype_name);
  }
  hid_t space = H5Dget_space(dataset);
  hsize_t dims[1] = {0};
  int rank = H5Sget_simple_extent_ndims(space);
  if (rank == 1) H5Sget_simple_extent_dims(space, dims, NULL);
  H5Sclose(space);
  if (rank != 1) {
    shard_fail();
    klt_user_error("dataset '%s' in shard %s is not 1-D; " REMAKE_HINT, name, path);
  }
  *length = dims[0];
  return dataset;
}

// Opens and checks one shard; its document offsets (document_count,) are returned in *doc_offsets.
static void shard_open(Shard *shard, const char *path, uint64_t **doc_offsets) {
  memset(shard, 0, sizeof(Shard));
  shard->path = klt_strdup(path);
  shard->loss_mask = H5I_INVALID_HID;
  h5io_lock();
  h5io_silence_errors();
  shard->file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  if (shard->file < 0) {
    shard_fail();
    klt_user_error("%s is not a readable HDF5 file; remove it from the dataset directory or " REMAKE_HINT,
                   path);
  }
  int64_t format_version = (int64_t)read_integer_attribute(path, shard->file, "format_version", 1);
  if (format_version != SHARD_FORMAT_VERSION) {
    shard_fail();
    klt_user_error("shard %s has format_version %lld but this klt reads version %d; " REMAKE_HINT " of "
                   "this version", path, (long long)format_version, SHARD_FORMAT_VERSION);
  }
  shard->vocab_size = read_integer_attribute(path, shard->file, "vocab_size", 0);
  uint64_t declared_tokens = read_integer_attribute(path, shard->file, "token_count", 0);
  read_string_attribute(path, shard->file, "tokenizer", shard->tokenizer, sizeof(shard->tokenizer));
  if (shard->vocab_size == 0 || shard->vocab_size > (uint64_t)UINT32_MAX + 1) {
    shard_fail();
    klt_user_error("shard %s has vocab_size %llu, outside 1..2^32; " REMAKE_HINT, path,
                   (unsigned long long)shard->vocab_size);
  }

  shard->tokens = open_vector(path, shard->file, "tokens", 4, "uint32", &shard->token_count);
  if (shard->token_count == 0) {
    shard_fail();
    klt_user_error("shard %s holds no tokens (its 'tokens' dataset is empty); remove it or " REMAKE_HINT,
                   path);
  }
  if (shard->token_count != declared_tokens) {
    shard_fail();
    klt_user_error("shard %s says token_count = %llu but its 'tokens' dataset holds %llu; " REMAKE_HINT, path,
                   (unsigned long long)declared_tokens, (unsigned long long)shard->token_count);
  }
  if (H5Lexists(shard->file, "loss_mask", H5P_DEFAULT) > 0) {
    uint64_t mask_length = 0;
    shard->loss_mask = open_vector(path, shard->file, "loss_mask", 1, "uint8", &mask_length);
    if (mask_length != shard->token_count) {
      shard_fail();
      klt_user_error("shard %s has %llu loss_mask entries for %llu tokens; " REMAKE_HINT, path,
                     (unsigned long long)mask_length, (unsigned long long)shard->token_count);
    }
  }

  hid_t offsets = open_vector(path, shard->file, "doc_offsets", 8, "uint64", &shard->document_count);
  *doc_offsets = klt_malloc((shard->document_count ? shard->document_count : 1) * sizeof(uint64_t));
  herr_t status = shard->document_count == 0 ? -1
                  : H5Dread(offsets, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, *doc_offsets);
  H5Dclose(offsets);
  if (status < 0 || (*doc_offsets)[0] != 0) {
    shard_fail();
    klt_user_error("shard %s has an empty or unreadable 'doc_offsets' or one that does not start at 0; "
                   REMAKE_HINT, path);
  }
  h5io_unlock();
  for (uint64_t d = 1; d < shard->document_count; d++) {
    if ((*doc_offsets)[d] <= (*doc_offsets)[d - 1] || (*doc_offsets)[d] >= shard->token_count)
      klt_user_error("shard %s: doc_offsets[%llu] = %llu is not increasing or not below token_count %llu; "
                     REMAKE_HINT, path, (unsigned long long)d, (unsigned long long)(*doc_offsets)[d],
                     (unsigned long long)shard->token_count);
  }
}

static void shard_close(Shard *shard) {
  h5io_lock();
  H5Dclose(shard->tokens);
  if (shard->loss_mask >= 0) H5Dclose(shard->loss_mask);
  H5Fclose(shard->file);
  h5io_unlock();
  free(shard->path);
}

static int compare_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_shard_name(const char *name) {
  size_t n = strlen(name);
  return n > 3 && strcmp(name + n - 3, ".h5") == 0;
}

void dataset_open(Dataset *dataset, const char *directory) {
  memset(dataset, 0, sizeof(Dataset));
  struct stat info;
  if (stat(directory, &info) != 0 || !S_ISDIR(info.st_mode))
    klt_user_error("dataset directory %s does not exist; create it with klt-data prep or klt-data synth, "
                   "or fix the path", directory);
  DIR *listing = opendir(directory);
  if (!listing) klt_user_error("cannot read dataset directory %s (%s); check its permissions", directory,
                               strerror(errno));
  char **names = NULL;
  int count = 0, capacity = 0;
  for (struct dirent *entry; (entry = readdir(listing)) != NULL;) {
    if (!is_shard_name(entry->d_name)) continue;
    if (count == capacity) {
      capacity = capacity ? 2 * capacity : 64;
      names = klt_realloc(names, (size_t)capacity * sizeof(char *));
    }
    names[count++] = klt_strdup(entry->d_name);
  }
  closedir(listing);
  if (count == 0)
    klt_user_error("dataset directory %s holds no *.h5 shards; fill it with klt-data prep or klt-data synth",
                   directory);
  qsort(names, (size_t)count, sizeof(char *), compare_names);

  dataset->directory = klt_strdup(directory);
  dataset->shard_count = count;
  dataset->shards = klt_calloc((size_t)count, sizeof(Shard));
  dataset->shard_start = klt_calloc((size_t)count + 1, sizeof(uint64_t));
  size_t document_capacity = 0;
  for (int i = 0; i < count; i++) {
    char *path = klt_malloc(strlen(directory) + strlen(names[i]) + 2);
    sprintf(path, "%s/%s", directory, names[i]);
    uint64_t *doc_offsets = NULL;
    Shard *shard = &dataset->shards[i];
    shard_open(shard, path, &doc_offsets);
    free(path);
    free(names[i]);
    if (i == 0) {
      dataset->vocab_size = shard->vocab_size;
      snprintf(dataset->tokenizer, sizeof(dataset->tokenizer), "%s", shard->tokenizer);
    } else if (shard->vocab_size != dataset->vocab_size || strcmp(shard->tokenizer, dataset->tokenizer) != 0) {
      klt_user_error("shard %s has vocab_size %llu and tokenizer '%s' but %s has %llu and '%s'; a dataset "
                     "must use one tokenizer throughout", shard->path, (unsigned long long)shard->vocab_size,
                     shard->tokenizer, dataset->shards[0].path, (unsigned long long)dataset->vocab_size,
                     dataset->tokenizer);
    }
    if (shard->loss_mask >= 0) dataset->has_loss_mask = 1;
    uint64_t start = dataset->shard_start[i];
    dataset->shard_start[i + 1] = start + shard->token_count;
    if (dataset->document_count + shard->document_count > document_capacity) {
      document_capacity = 2 * (dataset->document_count + shard->document_count);
      dataset->document_start = klt_realloc(dataset->document_start, document_capacity * sizeof(uint64_t));
    }
    for (uint64_t d = 0; d < shard->document_count; d++)
      dataset->document_start[dataset->document_count++] = start + doc_offsets[d];
    free(doc_offsets);
  }
  free(names);
  dataset->token_count = dataset->shard_start[count];
}

void dataset_close(Dataset *dataset) {
  for (int i = 0; i < dataset->shard_count; i++) shard_close(&dataset->shards[i]);
  free(dataset->shards);
  free(dataset->shard_start);
  free(dataset->document_start);
  free(dataset->directory);
  memset(dataset, 0, sizeof(Dataset));
}

// Index of the shard holding stream position `position` (< token_count).
static int dataset_find_shard(const Dataset *dataset, uint64_t position) {
  int lo = 0, hi = dataset->shard_count - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (dataset->shard_start[mid] <= position) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

static void read_range(const Shard *shard, hid_t dataset, hid_t memory_type, uint64_t offset, uint64_t count,
                       void *out) {
  hsize_t start[1] = {offset}, length[1] = {count};
  hid_t file_space = H5Dget_space(dataset);
  hid_t memory_space = H5Screate_simple(1, length, NULL);
  H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, NULL, length, NULL);
  herr_t status = H5Dread(dataset, memory_type, memory_space, file_space, H5P_DEFAULT, out);
  H5Sclose(memory_space);
  H5Sclose(file_space);
  if (status < 0) {
    shard_fail();
    klt_user_error("could not read tokens %llu..%llu of shard %s (the file is damaged); " REMAKE_HINT,
                   (unsigned long long)offset, (unsigned long long)(offset + count), shard->path);
  }
}

void dataset_read(const Dataset *dataset, uint64_t start, uint64_t count, uint32_t *tokens, uint8_t *loss_mask) {
  CHECK(start + count <= dataset->token_count, "read past the end of the dataset");
  while (count > 0) {
    int index = dataset_find_shard(dataset, start);
    const Shard *shard = &dataset->shards[index];
    uint64_t offset = start - dataset->shard_start[index];
    uint64_t take = shard->token_count - offset;
    if (take > count) take = count;
    h5io_lock();
    read_range(shard, shard->tokens, H5T_NATIVE_UINT32, offset, take, tokens);
    if (loss_mask && shard->loss_mask >= 0) read_range(shard, shard->loss_mask, H5T_NATIVE_UINT8, offset, take, loss_mask);
    h5io_unlock();
    if (loss_mask && shard->loss_mask < 0) memset(loss_mask, 1, take);
    tokens += take;
    if (loss_mask) loss_mask += take;
    start += take;
    count -= take;
  }
}

void dataset_check_token_range(const Dataset *dataset, uint64_t start, const uint32_t *tokens, uint64_t count,
                               uint64_t vocab_size, const char *vocab_name) {
  for (uint64_t i = 0; i < count; i++) {
    if (tokens[i] < vocab_size) continue;
    int index = dataset_find_shard(dataset, start + i);
    klt_user_error("token id %u at offset %llu of shard %s is not below the %s vocabulary size %llu; "
                   "re-create the data with the right --vocab-size or use a model with a larger vocabulary",
                   tokens[i], (unsigned long long)(start + i - dataset->shard_start[index]),
                   dataset->shards[index].path, vocab_name, (unsigned long long)vocab_size);
  }
}

void dataset_verify_tokens(const Dataset *dataset) {
  const uint64_t block = 1 << 20;
  uint32_t *tokens = klt_malloc(block * sizeof(uint32_t));
  uint8_t *mask = klt_malloc(block);
  for (uint64_t start = 0; start < dataset->token_count; start += block) {
    uint64_t count = dataset->token_count - start < block ? dataset->token_count - start : block;
    dataset_read(dataset, start, count, tokens, dataset->has_loss_mask ? mask : NULL);
    dataset_check_token_range(dataset, start, tokens, count, dataset->vocab_size, "dataset's");
  }
  free(tokens);
  free(mask);
}
