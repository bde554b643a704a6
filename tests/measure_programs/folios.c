/* folios N [advise]: maps 4 MiB, advises it MADV_HUGEPAGE with "advise",
 * writes one byte to each of N 64 KiB blocks (aligned inside the mapping),
 * then unmaps 16 KiB in the middle of block 0. Under hugepages-64kB=madvise
 * (2048kB never) with "advise": N faults, N 64 KiB folios, block 0's mapped
 * by 12 of its 16 pages; without: N faults and N order-0 pages. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 0;
    int advise = argc > 2 && strcmp(argv[2], "advise") == 0;
    size_t len = 4 << 20;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 1;
    if (advise && madvise(p, len, MADV_HUGEPAGE) != 0)
        return 1;
    char *base = (char *)(((uintptr_t)p + 0xffff) & ~(uintptr_t)0xffff);
    for (int i = 0; i < n; i++)
        base[(size_t)i * 2 * 0x10000 + 100] = 1;  /* every other block */
    if (n > 0 && munmap(base + 0x4000, 0x4000) != 0)
        return 1;
    return 0;
}
