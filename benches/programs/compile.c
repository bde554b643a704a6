/* Fixed input for the C compiler proper (cc1 -O2) in benches/real_programs.py:
 * self-contained (no headers), a few kinds of code the optimiser works on:
 * loops to vectorise and unroll, a switch interpreter, inlining, structs. */
typedef unsigned long size_t;
typedef struct node { struct node *next; long key; double val; } node;
typedef struct table { node **slots; size_t n, cap; } table;

extern void *malloc(size_t);
extern void free(void *);

static size_t hash(long k) { unsigned long x = (unsigned long)k; x ^= x >> 33; x *= 0xff51afd7ed558ccdUL; x ^= x >> 33; return x; }

table *table_new(size_t cap) {
    table *t = malloc(sizeof *t);
    t->slots = malloc(cap * sizeof *t->slots);
    for (size_t i = 0; i < cap; i++) t->slots[i] = 0;
    t->n = 0; t->cap = cap;
    return t;
}

static void table_grow(table *t) {
    size_t cap = t->cap * 2;
    node **s = malloc(cap * sizeof *s);
    for (size_t i = 0; i < cap; i++) s[i] = 0;
    for (size_t i = 0; i < t->cap; i++) {
        node *n = t->slots[i];
        while (n) { node *nx = n->next; size_t h = hash(n->key) % cap; n->next = s[h]; s[h] = n; n = nx; }
    }
    free(t->slots); t->slots = s; t->cap = cap;
}

double *table_put(table *t, long key) {
    if (t->n * 4 > t->cap * 3) table_grow(t);
    size_t h = hash(key) % t->cap;
    for (node *n = t->slots[h]; n; n = n->next) if (n->key == key) return &n->val;
    node *n = malloc(sizeof *n);
    n->key = key; n->val = 0; n->next = t->slots[h]; t->slots[h] = n; t->n++;
    return &n->val;
}

void saxpy(size_t n, float a, const float *restrict x, float *restrict y) {
    for (size_t i = 0; i < n; i++) y[i] = a * x[i] + y[i];
}

double dot(size_t n, const double *x, const double *y) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += x[i] * y[i];
    return s;
}

void matmul(int n, const double *a, const double *b, double *c) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += a[i * n + k] * b[k * n + j];
            c[i * n + j] = s;
        }
}

enum op { PUSH, ADD, SUB, MUL, DIV, DUP, SWAP, JZ, JMP, HALT };
struct insn { enum op op; long arg; };

long run(const struct insn *code, long *stack) {
    long sp = 0, pc = 0;
    for (;;) {
        struct insn in = code[pc++];
        switch (in.op) {
        case PUSH: stack[sp++] = in.arg; break;
        case ADD: sp--; stack[sp - 1] += stack[sp]; break;
        case SUB: sp--; stack[sp - 1] -= stack[sp]; break;
        case MUL: sp--; stack[sp - 1] *= stack[sp]; break;
        case DIV: sp--; if (stack[sp]) stack[sp - 1] /= stack[sp]; break;
        case DUP: stack[sp] = stack[sp - 1]; sp++; break;
        case SWAP: { long t = stack[sp - 1]; stack[sp - 1] = stack[sp - 2]; stack[sp - 2] = t; } break;
        case JZ: if (!stack[--sp]) pc = in.arg; break;
        case JMP: pc = in.arg; break;
        case HALT: return sp ? stack[sp - 1] : 0;
        }
    }
}

static inline int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

void blur(int w, int h, const unsigned char *src, unsigned char *dst) {
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            int s = 0;
            for (int dy = -1; dy <= 1; dy++)
                for (int dx = -1; dx <= 1; dx++)
                    s += src[clamp(y + dy, 0, h - 1) * w + clamp(x + dx, 0, w - 1)];
            dst[y * w + x] = (unsigned char)(s / 9);
        }
}

long collatz_max(long limit) {
    long best = 0, arg = 0;
    for (long i = 1; i < limit; i++) {
        long n = i, steps = 0;
        while (n != 1) { n = n & 1 ? 3 * n + 1 : n / 2; steps++; }
        if (steps > best) { best = steps; arg = i; }
    }
    return arg;
}

struct vec3 { double x, y, z; };
static struct vec3 add(struct vec3 a, struct vec3 b) { return (struct vec3){a.x + b.x, a.y + b.y, a.z + b.z}; }
static struct vec3 scale(struct vec3 a, double s) { return (struct vec3){a.x * s, a.y * s, a.z * s}; }
static double vdot(struct vec3 a, struct vec3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }

double simulate(int steps, struct vec3 *pos, struct vec3 *vel, int n) {
    double e = 0;
    for (int s = 0; s < steps; s++)
        for (int i = 0; i < n; i++) {
            struct vec3 f = {0, 0, 0};
            for (int j = 0; j < n; j++)
                if (j != i) f = add(f, scale(add(pos[j], scale(pos[i], -1)), 0.001));
            vel[i] = add(vel[i], f);
            pos[i] = add(pos[i], scale(vel[i], 0.01));
            e += vdot(vel[i], vel[i]);
        }
    return e;
}
