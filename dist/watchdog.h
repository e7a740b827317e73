/* A step watchdog: a rank whose step (or any collective inside it) takes longer than the deadline stops
 * the process with one clear message instead of hanging forever; mpirun then takes the other ranks
 * down. A background thread checks the deadline once a second; the training loop arms it at the start
 * of each step. With the CUDA backend it also polls the NCCL communicators' asynchronous errors (a peer
 * that died or a failed transport) and stops the same way. */
#pragma once

typedef struct Watchdog Watchdog;
struct Comm;

// Starts the watchdog (timeout_seconds <= 0: none, returns NULL). rank names the rank in the message.
Watchdog *watchdog_start(double timeout_seconds, int rank);
// The same, also polling comm's NCCL errors (comm may be NULL); runs for comm even without a timeout.
Watchdog *watchdog_start_with(double timeout_seconds, int rank, const struct Comm *comm);
// The step `step` begins now: its deadline is now + timeout.
void watchdog_arm(Watchdog *watchdog, long step);
void watchdog_stop(Watchdog *watchdog);
