/* A step watchdog: a rank whose step (or any collective inside it) takes longer than the deadline stops
 * the process with one clear message instead of hanging forever; mpirun then takes the other ranks
 * down. A background thread checks the deadline once a second; the training loop arms it at the start
 * of each step. */
#pragma once

typedef struct Watchdog Watchdog;

// Starts the watchdog (timeout_seconds <= 0: none, returns NULL). rank names the rank in the message.
Watchdog *watchdog_start(double timeout_seconds, int rank);
// The step `step` begins now: its deadline is now + timeout.
void watchdog_arm(Watchdog *watchdog, long step);
void watchdog_stop(Watchdog *watchdog);
