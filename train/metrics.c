// metrics.jsonl writer; see metrics.h.
#include "train/metrics.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/check.h"

void make_directories(const char *path) {
  char partial[1024];
  snprintf(partial, sizeof partial, "%s", path);
  for (char *p = partial + 1;; p++) {
    if (*p == '/' || *p == '\0') {
      char saved = *p;
      *p = '\0';
      if (mkdir(partial, 0755) != 0 && errno != EEXIST)
        klt_user_error("cannot create directory '%s' (%s)", partial, strerror(errno));
      *p = saved;
      if (saved == '\0') break;
    }
  }
}

void metrics_open(MetricsLog *log, const char *run_dir) {
  make_directories(run_dir);
  snprintf(log->path, sizeof log->path, "%s/metrics.jsonl", run_dir);
  log->file = fopen(log->path, "a");
  if (!log->file) klt_user_error("cannot open '%s' for appending (%s)", log->path, strerror(errno));
}

void metrics_close(MetricsLog *log) {
  if (log->file) fclose(log->file);
  log->file = NULL;
}

void metrics_write(MetricsLog *log, const char *kind, int count, const char *const *names, const double *values) {
  if (!log->file) return;
  cJSON *object = cJSON_CreateObject();
  cJSON_AddStringToObject(object, "kind", kind);
  for (int i = 0; i < count; i++) {
    if (isfinite(values[i])) cJSON_AddNumberToObject(object, names[i], values[i]);
    else cJSON_AddNullToObject(object, names[i]);  // JSON has no NaN or infinity
  }
  char *text = cJSON_PrintUnformatted(object);
  fprintf(log->file, "%s\n", text);
  fflush(log->file);
  free(text);
  cJSON_Delete(object);
}
