/*
 * eval_cmds.h - entry points of the evaluation subcommands of livekvq, each
 * in its own file: ablate (tools/ablate.c), needle (tools/needle.c),
 * profile (tools/profile.c). Each takes argv from the subcommand name on
 * (argv[0] = "ablate", ...) and returns the process exit status: 0 ok,
 * 1 runtime error, 2 usage error (one line on stderr saying why).
 */
#ifndef LKQ_EVAL_CMDS_H
#define LKQ_EVAL_CMDS_H

int abl_main(int argc, char **argv);
int ndl_main(int argc, char **argv);
int prf_main(int argc, char **argv);

#endif
