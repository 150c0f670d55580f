/* A C program with <sys/sdt.h> probes named like the replica's, for vsrscope's discovery and
 * argument decoding: at -O0 gcc passes the arguments from the stack (-8@-24(%rbp)), at -O2 in
 * registers and as constants ($2). Fires prepare_quorum COUNT times with latency 1000000 + i. */
#include <stdint.h>
#include <stdlib.h>
#include <sys/sdt.h>

int main(int argc, char **argv) {
    int64_t count = argc > 1 ? atoll(argv[1]) : 1000;
    volatile uint8_t replica_id = 3;
    for (int64_t op = 0; op < count; op++) {
        uint64_t latency_ns = 1000000 + (uint64_t)op;
        DTRACE_PROBE4(vsr, prepare_quorum, replica_id, op, latency_ns, 2);
    }
    return 0;
}
