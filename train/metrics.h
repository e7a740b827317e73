/* Appends one JSON object per line to <run_dir>/metrics.jsonl (cJSON), the machine-readable twin of
 * the per-step console line. Only the main rank writes. */
#pragma once
#include <stdio.h>

typedef struct {
  FILE *file;
  char path[1024];
} MetricsLog;

// Creates run_dir (and parents) if needed and opens metrics.jsonl for appending; user error if it cannot.
void metrics_open(MetricsLog *log, const char *run_dir);
void metrics_close(MetricsLog *log);
// Writes {"kind": kind, name[i]: value[i]...} as one line and flushes (a crash loses no finished line).
void metrics_write(MetricsLog *log, const char *kind, int count, const char *const *names, const double *values);

// mkdir -p; user error naming the path when it cannot be made.
void make_directories(const char *path);
