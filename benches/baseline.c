/*
 * The bare floor of an anonymous page fault, for comparing the simulator
 * against: per fault, a 4-level radix walk (512-entry tables allocated on
 * first use), an uncontended spinlock on the PTE table's lock word
 * (GCC __atomic builtins), a none-check of the PTE(s), a store of pfn|flags
 * and a bump allocator for pfns. Nothing else: no VMA, no counters, no
 * struct page, no memcg.
 *
 *   gcc -O2 -o target/baseline benches/baseline.c
 *   target/baseline PAGES [PAGES_PER_FAULT] [REPS]
 *
 * PAGES_PER_FAULT is 1 (order 0, the default) or 16 (64kB: one lock, a
 * 16-PTE none-check and 16 PTE stores per fault, at every 16th page).
 * Each rep starts from an empty page table; the best rep is printed as
 *   baseline pages=N pages_per_fault=K ns_per_page=X ns_per_fault=Y
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PTRS 512
#define PAGE_SHIFT 12
#define PTE_PRESENT 1ull
#define PTE_WRITE 2ull
/* Same base as the simulator's workloads (WORKLOAD_BASE). */
#define BASE 0x100000000000ull

/* A PTE table and its split lock, as the simulator's PteTable. */
struct pte_table {
	uint32_t lock;
	uint64_t pte[PTRS] __attribute__((aligned(64)));
};

struct dir {
	void *e[PTRS];
};

static struct dir *pgd;
static uint64_t next_pfn;
static size_t nr_tables;

static void *zalloc(size_t n)
{
	void *p = calloc(1, n);
	if (!p) {
		fprintf(stderr, "baseline: out of memory\n");
		exit(1);
	}
	nr_tables++;
	return p;
}

static inline void spin_lock(uint32_t *l)
{
	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(l, __ATOMIC_RELAXED))
			__builtin_ia32_pause();
}

static inline void spin_unlock(uint32_t *l)
{
	__atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

/* Walks to the PTE table of addr, allocating missing levels. */
static inline struct pte_table *walk(uint64_t addr)
{
	void **pud_slot = &pgd->e[(addr >> 39) & 511];
	if (!*pud_slot)
		*pud_slot = zalloc(sizeof(struct dir));
	struct dir *pud = *pud_slot;
	void **pmd_slot = &pud->e[(addr >> 30) & 511];
	if (!*pmd_slot)
		*pmd_slot = zalloc(sizeof(struct dir));
	struct dir *pmd = *pmd_slot;
	void **pte_slot = &pmd->e[(addr >> 21) & 511];
	if (!*pte_slot)
		*pte_slot = zalloc(sizeof(struct pte_table));
	return *pte_slot;
}

/* One fault mapping nr pages at addr (aligned to nr pages). */
static inline __attribute__((always_inline)) void fault(uint64_t addr, unsigned nr)
{
	struct pte_table *t = walk(addr);
	unsigned i = (addr >> PAGE_SHIFT) & 511;
	uint64_t pfn = next_pfn;
	next_pfn += nr;
	spin_lock(&t->lock);
	int none = 1;
	for (unsigned k = 0; k < nr; k++)
		none &= t->pte[i + k] == 0;
	if (none)
		for (unsigned k = 0; k < nr; k++)
			t->pte[i + k] = ((pfn + k) << PAGE_SHIFT) | PTE_PRESENT | PTE_WRITE;
	spin_unlock(&t->lock);
}

static void free_tables(void)
{
	for (int a = 0; a < PTRS; a++) {
		struct dir *pud = pgd->e[a];
		if (!pud)
			continue;
		for (int b = 0; b < PTRS; b++) {
			struct dir *pmd = pud->e[b];
			if (!pmd)
				continue;
			for (int c = 0; c < PTRS; c++)
				free(pmd->e[c]);
			free(pmd);
		}
		free(pud);
	}
	memset(pgd, 0, sizeof(*pgd));
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Separate loops so that nr is a constant the compiler unrolls. */
static __attribute__((noinline)) void run_order0(uint64_t pages)
{
	for (uint64_t p = 0; p < pages; p++)
		fault(BASE + (p << PAGE_SHIFT), 1);
}

static __attribute__((noinline)) void run_64k(uint64_t pages)
{
	for (uint64_t p = 0; p < pages; p += 16)
		fault(BASE + (p << PAGE_SHIFT), 16);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PAGES [PAGES_PER_FAULT (1|16)] [REPS]\n", argv[0]);
		return 2;
	}
	uint64_t pages = strtoull(argv[1], NULL, 0);
	unsigned nr = argc > 2 ? atoi(argv[2]) : 1;
	int reps = argc > 3 ? atoi(argv[3]) : 1;
	if ((nr != 1 && nr != 16) || pages == 0 || pages % nr || reps < 1) {
		fprintf(stderr, "baseline: PAGES must be a positive multiple of PAGES_PER_FAULT (1 or 16)\n");
		return 2;
	}
	pgd = zalloc(sizeof(struct dir));
	double best = 1e30;
	uint64_t check = 0;
	for (int r = 0; r < reps; r++) {
		next_pfn = 0;
		double t0 = now();
		if (nr == 1)
			run_order0(pages);
		else
			run_64k(pages);
		double el = now() - t0;
		if (el < best)
			best = el;
		/* Check the result, so nothing can be optimised away. */
		struct pte_table *t = walk(BASE + ((pages - 1) << PAGE_SHIFT));
		check = t->pte[((BASE >> PAGE_SHIFT) + pages - 1) & 511] >> PAGE_SHIFT;
		if (check != pages - 1) {
			fprintf(stderr, "baseline: last PTE maps pfn %llu, not %llu\n",
				(unsigned long long)check, (unsigned long long)(pages - 1));
			return 1;
		}
		if (r + 1 < reps)
			free_tables();
	}
	printf("baseline pages=%llu pages_per_fault=%u ns_per_page=%.2f ns_per_fault=%.2f elapsed_s=%.4f\n",
	       (unsigned long long)pages, nr, best * 1e9 / pages, best * 1e9 * nr / pages, best);
	return 0;
}
