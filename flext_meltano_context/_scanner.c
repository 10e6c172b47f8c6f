/* The relay's compiled scanner (issue 14): one pass over a region of whole Singer lines.
 *
 * A line is handled here only when it is certainly what the pure-Python relay would call a clean
 * RECORD of a stream whose SCHEMA it has seen: strict JSON (RFC 8259), valid UTF-8, one top-level
 * object whose `type` is exactly "RECORD" and whose `stream` names a registered stream, both
 * without escapes, no duplicated or escaped top-level member names, nesting up to MAX_DEPTH.
 * Every other line (SCHEMA, STATE, other types, blank or malformed lines, NaN, lone surrogate
 * escapes, unknown streams, keys that need exact decimal arithmetic) is handed back to Python as
 * an "event" and goes through the exact path, so results are identical by construction: what is
 * accepted here is a subset of what msgspec accepts with the same `type` and `stream`.
 *
 * For keyed streams the record's key properties are turned into the canonical byte form of
 * flext_meltano_context/keys.py and kept in a per-stream hash set, drained into a KeySet by
 * Python in batches. The scan runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Bump when the Python-facing interface changes: relay.py refuses another value. */
#define ABI_VERSION 1
#ifndef SOURCE_SHA256
#define SOURCE_SHA256 ""
#endif
#define MAX_DEPTH 64
#define MAX_KEYS 16
#define NUMBER_DIGITS_LIMIT 300 /* wider keys go to Python (Decimal arithmetic) */

enum { SC_OK = 0, SC_EVENT = 1, SC_NOMEM = 2 };

typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static int buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) {
        return 0;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int buf_put(buf_t *b, const void *data, size_t n) {
    if (buf_reserve(b, n)) {
        return -1;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 1099511628211ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    while (n--) {
        h = (h ^ *p++) * 1099511628211ULL;
    }
    h ^= h >> 32;
    return h | (1ULL << 63); /* 0 marks an empty slot */
}

/* ---- a set of canonical keys: open addressing into one arena ------------------------------ */

typedef struct {
    uint64_t hash;
    uint32_t off, len;
} slot_t;

typedef struct {
    slot_t *slots;
    size_t cap, used;
    buf_t arena;
} keyset_t;

static void keyset_free(keyset_t *ks) {
    free(ks->slots);
    free(ks->arena.p);
    memset(ks, 0, sizeof(*ks));
}

/* Empty, keeping the memory: the next batch reuses warm pages instead of faulting new ones. */
static void keyset_clear(keyset_t *ks) {
    if (ks->slots != NULL) {
        memset(ks->slots, 0, ks->cap * sizeof(slot_t));
    }
    ks->used = 0;
    ks->arena.len = 0;
}

static int keyset_grow(keyset_t *ks) {
    size_t cap = ks->cap ? ks->cap * 2 : 1024;
    slot_t *slots = calloc(cap, sizeof(slot_t));
    if (slots == NULL) {
        return -1;
    }
    for (size_t i = 0; i < ks->cap; i++) {
        if (ks->slots[i].hash) {
            size_t j = ks->slots[i].hash & (cap - 1);
            while (slots[j].hash) {
                j = (j + 1) & (cap - 1);
            }
            slots[j] = ks->slots[i];
        }
    }
    free(ks->slots);
    ks->slots = slots;
    ks->cap = cap;
    return 0;
}

static int keyset_add(keyset_t *ks, const uint8_t *p, size_t n, uint64_t h) {
    if ((ks->used + 1) * 2 > ks->cap && keyset_grow(ks)) {
        return -1;
    }
    size_t mask = ks->cap - 1, i = h & mask;
    while (ks->slots[i].hash) {
        slot_t *s = &ks->slots[i];
        if (s->hash == h && s->len == n && memcmp(ks->arena.p + s->off, p, n) == 0) {
            return 0;
        }
        i = (i + 1) & mask;
    }
    size_t off = ks->arena.len;
    if (buf_put(&ks->arena, p, n)) {
        return -1;
    }
    ks->slots[i].hash = h;
    ks->slots[i].off = (uint32_t)off;
    ks->slots[i].len = (uint32_t)n;
    ks->used++;
    return 0;
}

/* ---- streams ------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *name;
    size_t name_len;
    uint64_t hash;
    long long records, bytes;
    double first, last;
    int seen;  /* first/last are set */
    int nkeys; /* 0: not keyed; -1: keyed, but keys are collected in Python */
    uint8_t *keys[MAX_KEYS];
    size_t key_lens[MAX_KEYS];
    keyset_t set;
} stream_t;

/* Keys wait in a short queue so their table slots can be prefetched: the input streaming through
 * the caches evicts the table, and one miss per key was most of the key collection's cost. */
#define PENDING 16

typedef struct {
    stream_t *st;
    uint64_t hash;
    size_t off, len;
} pending_t;

typedef struct {
    PyObject_HEAD
    pending_t pending[PENDING];
    int npending;
    buf_t pending_keys;
    stream_t **streams;
    size_t nstreams, cap;
    int32_t *index; /* open addressing over stream names; -1 empty */
    size_t index_cap;
    buf_t key; /* the canonical key being built */
    size_t key_bytes; /* arena bytes across all streams since the last drain */
    size_t key_count; /* distinct keys held across all streams since the last drain */
    int busy;
} Scanner;

static stream_t *find_stream(Scanner *sc, const uint8_t *name, size_t n) {
    if (sc->index_cap == 0) {
        return NULL;
    }
    uint64_t h = hash_bytes(name, n);
    size_t mask = sc->index_cap - 1, i = h & mask;
    while (sc->index[i] >= 0) {
        stream_t *st = sc->streams[sc->index[i]];
        if (st->hash == h && st->name_len == n && memcmp(st->name, name, n) == 0) {
            return st;
        }
        i = (i + 1) & mask;
    }
    return NULL;
}

static int index_rebuild(Scanner *sc, size_t cap) {
    int32_t *index = malloc(cap * sizeof(int32_t));
    if (index == NULL) {
        return -1;
    }
    for (size_t i = 0; i < cap; i++) {
        index[i] = -1;
    }
    for (size_t k = 0; k < sc->nstreams; k++) {
        size_t i = sc->streams[k]->hash & (cap - 1);
        while (index[i] >= 0) {
            i = (i + 1) & (cap - 1);
        }
        index[i] = (int32_t)k;
    }
    free(sc->index);
    sc->index = index;
    sc->index_cap = cap;
    return 0;
}

/* ---- strict JSON, one line ----------------------------------------------------------------- */

typedef struct {
    const uint8_t *s;
    size_t stop;
    const stream_t *keyed; /* set while the record is parsed when the stream came first */
    size_t key_at[MAX_KEYS], key_end[MAX_KEYS];
    int key_found[MAX_KEYS];
} line_t;

static inline size_t skip_ws(const uint8_t *s, size_t pos, size_t stop) {
    while (pos < stop && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\r')) {
        pos++;
    }
    return pos;
}

static inline int hex4(const uint8_t *s, size_t pos, size_t stop, unsigned *out) {
    if (pos + 4 > stop) {
        return -1;
    }
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = s[pos + i];
        v <<= 4;
        if (c >= '0' && c <= '9') {
            v |= (unsigned)(c - '0');
        } else if (c >= 'a' && c <= 'f') {
            v |= (unsigned)(c - 'a' + 10);
        } else if (c >= 'A' && c <= 'F') {
            v |= (unsigned)(c - 'A' + 10);
        } else {
            return -1;
        }
    }
    *out = v;
    return 0;
}

/* Length of the valid UTF-8 sequence at s[pos] (a byte >= 0x80), 0 if invalid (as Python). */
static inline size_t utf8_seq(const uint8_t *s, size_t pos, size_t stop) {
    uint8_t c = s[pos];
    if (c < 0xC2) {
        return 0;
    }
    if (c < 0xE0) {
        return (pos + 1 < stop && (s[pos + 1] & 0xC0) == 0x80) ? 2 : 0;
    }
    if (c < 0xF0) {
        if (pos + 2 >= stop) {
            return 0;
        }
        uint8_t c1 = s[pos + 1];
        uint8_t lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return (c1 >= lo && c1 <= hi && (s[pos + 2] & 0xC0) == 0x80) ? 3 : 0;
    }
    if (c < 0xF5) {
        if (pos + 3 >= stop) {
            return 0;
        }
        uint8_t c1 = s[pos + 1];
        uint8_t lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        return (c1 >= lo && c1 <= hi && (s[pos + 2] & 0xC0) == 0x80 &&
                (s[pos + 3] & 0xC0) == 0x80)
                   ? 4
                   : 0;
    }
    return 0;
}

/* A string starting at s[*pos] == '"'; on success *pos is past the closing quote. Lone
 * surrogate escapes are refused: msgspec refuses them, json.loads does not (Python decides). */
static int parse_string(const uint8_t *s, size_t *ppos, size_t stop, int *escaped) {
    size_t pos = *ppos + 1;
#if defined(__SSE2__)
    const __m128i quote = _mm_set1_epi8('"'), slash = _mm_set1_epi8('\\');
    const __m128i space = _mm_set1_epi8(0x20);
#endif
    for (;;) {
#if defined(__SSE2__)
        while (pos + 16 <= stop) {
            __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(s + pos));
            /* signed compare: below 0x20 and at or above 0x80 both count as special */
            __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, slash)),
                                     _mm_cmplt_epi8(v, space));
            int mask = _mm_movemask_epi8(m);
            if (mask) {
                pos += (size_t)__builtin_ctz((unsigned)mask);
                break;
            }
            pos += 16;
        }
#endif
        while (pos < stop) {
            uint8_t c = s[pos];
            if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) {
                break;
            }
            pos++;
        }
        if (pos >= stop) {
            return SC_EVENT;
        }
        uint8_t c = s[pos];
        if (c == '"') {
            *ppos = pos + 1;
            return SC_OK;
        }
        if (c < 0x20) {
            return SC_EVENT;
        }
        if (c >= 0x80) {
            size_t n = utf8_seq(s, pos, stop);
            if (n == 0) {
                return SC_EVENT;
            }
            pos += n;
            continue;
        }
        /* an escape */
        *escaped = 1;
        if (pos + 1 >= stop) {
            return SC_EVENT;
        }
        switch (s[pos + 1]) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
            pos += 2;
            break;
        case 'u': {
            unsigned cp;
            if (hex4(s, pos + 2, stop, &cp)) {
                return SC_EVENT;
            }
            pos += 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return SC_EVENT;
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo = 0xDC00;
                if (pos + 1 >= stop || s[pos] != '\\' || s[pos + 1] != 'u' ||
                    hex4(s, pos + 2, stop, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                    return SC_EVENT;
                }
                pos += 6;
            }
            break;
        }
        default:
            return SC_EVENT;
        }
    }
}

static inline int is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

static int parse_number(const uint8_t *s, size_t *ppos, size_t stop) {
    size_t pos = *ppos;
    if (s[pos] == '-') {
        pos++;
    }
    if (pos >= stop) {
        return SC_EVENT;
    }
    if (s[pos] == '0') {
        pos++;
    } else if (s[pos] >= '1' && s[pos] <= '9') {
        while (pos < stop && is_digit(s[pos])) {
            pos++;
        }
    } else {
        return SC_EVENT;
    }
    if (pos < stop && s[pos] == '.') {
        pos++;
        if (pos >= stop || !is_digit(s[pos])) {
            return SC_EVENT;
        }
        while (pos < stop && is_digit(s[pos])) {
            pos++;
        }
    }
    if (pos < stop && (s[pos] == 'e' || s[pos] == 'E')) {
        pos++;
        if (pos < stop && (s[pos] == '+' || s[pos] == '-')) {
            pos++;
        }
        if (pos >= stop || !is_digit(s[pos])) {
            return SC_EVENT;
        }
        while (pos < stop && is_digit(s[pos])) {
            pos++;
        }
    }
    *ppos = pos;
    return SC_OK;
}

static int parse_value(const uint8_t *s, size_t *ppos, size_t stop, int depth);

static inline int literal(const uint8_t *s, size_t *ppos, size_t stop, const char *word, size_t n) {
    if (*ppos + n > stop || memcmp(s + *ppos, word, n) != 0) {
        return SC_EVENT;
    }
    *ppos += n;
    return SC_OK;
}

/* An object at s[*pos] == '{'. With `ln` (the record of a keyed stream), the spans of the
 * members named like a key property are kept; an escaped member name then defers to Python. */
static int parse_object(const uint8_t *s, size_t *ppos, size_t stop, int depth, line_t *ln) {
    if (depth > MAX_DEPTH) {
        return SC_EVENT;
    }
    size_t pos = skip_ws(s, *ppos + 1, stop);
    if (pos < stop && s[pos] == '}') {
        *ppos = pos + 1;
        return SC_OK;
    }
    for (;;) {
        if (pos >= stop || s[pos] != '"') {
            return SC_EVENT;
        }
        size_t name_at = pos + 1;
        int escaped = 0;
        if (parse_string(s, &pos, stop, &escaped)) {
            return SC_EVENT;
        }
        uint32_t slots = 0; /* the key properties this member is (["id", "id"]: two) */
        if (ln != NULL) {
            if (escaped) {
                return SC_EVENT;
            }
            size_t n = pos - 1 - name_at;
            for (int k = 0; k < ln->keyed->nkeys; k++) {
                if (ln->keyed->key_lens[k] == n && memcmp(ln->keyed->keys[k], s + name_at, n) == 0) {
                    if (ln->key_found[k]) {
                        return SC_EVENT; /* a duplicated member: Python decides */
                    }
                    slots |= 1u << k;
                }
            }
        }
        pos = skip_ws(s, pos, stop);
        if (pos >= stop || s[pos] != ':') {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos + 1, stop);
        size_t value_at = pos;
        if (parse_value(s, &pos, stop, depth + 1)) {
            return SC_EVENT;
        }
        for (int k = 0; slots; k++, slots >>= 1) {
            if (slots & 1u) {
                ln->key_found[k] = 1;
                ln->key_at[k] = value_at;
                ln->key_end[k] = pos;
            }
        }
        pos = skip_ws(s, pos, stop);
        if (pos >= stop) {
            return SC_EVENT;
        }
        if (s[pos] == '}') {
            *ppos = pos + 1;
            return SC_OK;
        }
        if (s[pos] != ',') {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos + 1, stop);
    }
}

static int parse_array(const uint8_t *s, size_t *ppos, size_t stop, int depth) {
    if (depth > MAX_DEPTH) {
        return SC_EVENT;
    }
    size_t pos = skip_ws(s, *ppos + 1, stop);
    if (pos < stop && s[pos] == ']') {
        *ppos = pos + 1;
        return SC_OK;
    }
    for (;;) {
        if (parse_value(s, &pos, stop, depth + 1)) {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos, stop);
        if (pos >= stop) {
            return SC_EVENT;
        }
        if (s[pos] == ']') {
            *ppos = pos + 1;
            return SC_OK;
        }
        if (s[pos] != ',') {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos + 1, stop);
    }
}

static int parse_value(const uint8_t *s, size_t *ppos, size_t stop, int depth) {
    if (*ppos >= stop) {
        return SC_EVENT;
    }
    int escaped = 0;
    switch (s[*ppos]) {
    case '"':
        return parse_string(s, ppos, stop, &escaped);
    case '{':
        return parse_object(s, ppos, stop, depth, NULL);
    case '[':
        return parse_array(s, ppos, stop, depth);
    case 't':
        return literal(s, ppos, stop, "true", 4);
    case 'f':
        return literal(s, ppos, stop, "false", 5);
    case 'n':
        return literal(s, ppos, stop, "null", 4);
    default:
        return parse_number(s, ppos, stop);
    }
}

/* ---- canonical keys (keys.py's form) -------------------------------------------------------- */

static int put_tagged(buf_t *b, uint8_t tag, const uint8_t *payload, size_t n) {
    uint8_t head[5] = {tag, (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)(n >> 16), (uint8_t)(n >> 24)};
    if (buf_put(b, head, 5) || (n && buf_put(b, payload, n))) {
        return -1;
    }
    return 0;
}

static inline int put_utf8(buf_t *b, unsigned cp) {
    uint8_t out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        n = 1;
    } else if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (uint8_t)(0xF0 | (cp >> 18));
        out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (uint8_t)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return buf_put(b, out, n);
}

/* `S` + the string's UTF-8 with escapes resolved (the string was validated: no lone surrogate). */
static int canon_string(buf_t *b, const uint8_t *s, size_t at, size_t end) {
    size_t head = b->len;
    if (put_tagged(b, 'S', NULL, 0)) {
        return -1;
    }
    size_t pos = at + 1, stop = end - 1;
    while (pos < stop) {
        const uint8_t *bs = memchr(s + pos, '\\', stop - pos);
        size_t run = (bs ? (size_t)(bs - s) : stop) - pos;
        if (buf_put(b, s + pos, run)) {
            return -1;
        }
        pos += run;
        if (pos >= stop) {
            break;
        }
        uint8_t e = s[pos + 1];
        unsigned cp = 0;
        switch (e) {
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u': {
            hex4(s, pos + 2, end, &cp);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo = 0xDC00;
                hex4(s, pos + 8, end, &lo);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                pos += 6;
            }
            pos += 4;
            break;
        }
        default: cp = e; break;
        }
        pos += 2;
        if (put_utf8(b, cp)) {
            return -1;
        }
    }
    size_t n = b->len - head - 5;
    b->p[head + 1] = (uint8_t)n;
    b->p[head + 2] = (uint8_t)(n >> 8);
    b->p[head + 3] = (uint8_t)(n >> 16);
    b->p[head + 4] = (uint8_t)(n >> 24);
    return 0;
}

/* A JSON number as keys.py's `_number`: `I` for an integral value, `D` ('%.17g') otherwise.
 * Returns SC_EVENT for values where keys.py's Decimal arithmetic would need more room (very wide
 * or tiny numbers, near the float range's ends): Python decides those. */
static int canon_number(buf_t *b, const uint8_t *s, size_t at, size_t end) {
    size_t pos = at;
    int negative = s[pos] == '-';
    if (negative) {
        pos++;
    }
    size_t int_at = pos;
    while (pos < end && is_digit(s[pos])) {
        pos++;
    }
    size_t int_end = pos, frac_at = pos, frac_end = pos;
    if (pos < end && s[pos] == '.') {
        frac_at = ++pos;
        while (pos < end && is_digit(s[pos])) {
            pos++;
        }
        frac_end = pos;
    }
    long exp = 0;
    if (pos < end && (s[pos] == 'e' || s[pos] == 'E')) {
        pos++;
        int exp_negative = 0;
        if (s[pos] == '+' || s[pos] == '-') {
            exp_negative = s[pos] == '-';
            pos++;
        }
        if (end - pos > 6) {
            return SC_EVENT;
        }
        while (pos < end) {
            exp = exp * 10 + (s[pos++] - '0');
        }
        if (exp_negative) {
            exp = -exp;
        }
    }
    /* the coefficient's digits (integer then fraction), leading zeros dropped */
    uint8_t digits[NUMBER_DIGITS_LIMIT];
    size_t nd = 0;
    for (int part = 0; part < 2; part++) {
        size_t from = part ? frac_at : int_at, to = part ? frac_end : int_end;
        for (size_t i = from; i < to; i++) {
            if (nd == 0 && s[i] == '0') {
                continue;
            }
            if (nd >= NUMBER_DIGITS_LIMIT) {
                return SC_EVENT;
            }
            digits[nd++] = s[i];
        }
    }
    long exponent = exp - (long)(frac_end - frac_at);
    if (nd == 0) {
        /* zero: integral, `I0` (int() drops the sign) unless the exponent is huge (keys.py: D) */
        if (exponent > NUMBER_DIGITS_LIMIT || exponent < -NUMBER_DIGITS_LIMIT) {
            return SC_EVENT;
        }
        return put_tagged(b, 'I', (const uint8_t *)"0", 1) ? SC_NOMEM : SC_OK;
    }
    long adjusted = exponent + (long)nd - 1;
    if (adjusted > 290 || adjusted < -290 || (long)nd + (exponent > 0 ? exponent : 0) > 390) {
        return SC_EVENT;
    }
    int integral = exponent >= 0;
    if (!integral && (size_t)(-exponent) <= nd) {
        integral = 1;
        for (size_t i = nd - (size_t)(-exponent); i < nd; i++) {
            if (digits[i] != '0') {
                integral = 0;
                break;
            }
        }
    }
    if (integral) {
        size_t head = b->len;
        if (put_tagged(b, 'I', NULL, 0)) {
            return SC_NOMEM;
        }
        if (negative && buf_put(b, "-", 1)) {
            return SC_NOMEM;
        }
        size_t keep = exponent >= 0 ? nd : nd - (size_t)(-exponent);
        if (keep == 0) {
            b->len = head; /* unreachable: a non-zero integral value has an integer digit */
            return SC_EVENT;
        }
        if (buf_put(b, digits, keep)) {
            return SC_NOMEM;
        }
        for (long z = 0; z < exponent; z++) {
            if (buf_put(b, "0", 1)) {
                return SC_NOMEM;
            }
        }
        size_t n = b->len - head - 5;
        b->p[head + 1] = (uint8_t)n;
        b->p[head + 2] = (uint8_t)(n >> 8);
        b->p[head + 3] = (uint8_t)(n >> 16);
        b->p[head + 4] = (uint8_t)(n >> 24);
        return SC_OK;
    }
    char text[NUMBER_DIGITS_LIMIT * 2 + 64], out[64];
    size_t n = end - at;
    if (n >= sizeof(text)) {
        return SC_EVENT;
    }
    memcpy(text, s + at, n);
    text[n] = '\0';
    double value = strtod(text, NULL); /* correctly rounded, as float(Decimal(text)) */
    int written = snprintf(out, sizeof(out), "%.17g", value);
    if (written <= 0 || (size_t)written >= sizeof(out)) {
        return SC_EVENT;
    }
    return put_tagged(b, 'D', (const uint8_t *)out, (size_t)written) ? SC_NOMEM : SC_OK;
}

static int canon_component(buf_t *b, const uint8_t *s, size_t at, size_t end) {
    switch (s[at]) {
    case '"':
        return canon_string(b, s, at, end) ? SC_NOMEM : SC_OK;
    case 'n':
        return put_tagged(b, 'N', NULL, 0) ? SC_NOMEM : SC_OK;
    case 't':
        return put_tagged(b, 'T', NULL, 0) ? SC_NOMEM : SC_OK;
    case 'f':
        return put_tagged(b, 'F', NULL, 0) ? SC_NOMEM : SC_OK;
    case '{':
    case '[':
        return put_tagged(b, 'O', s + at, end - at) ? SC_NOMEM : SC_OK;
    default:
        return canon_number(b, s, at, end);
    }
}

/* ---- one line ------------------------------------------------------------------------------ */

/* Scan the line at s[start..]; SC_OK when it is a clean RECORD of a registered stream, with *end
 * at its '\n' (or the region's end) and its key (if keyed) in sc->key. */
static int scan_line(Scanner *sc, const uint8_t *s, size_t start, size_t stop, size_t *end,
                     stream_t **out) {
    line_t ln;
    ln.s = s;
    ln.stop = stop;
    ln.keyed = NULL;
    size_t type_at = 0, type_len = 0, stream_at = 0, stream_len = 0, record_at = 0;
    int has_type = 0, has_stream = 0, has_record = 0;
    stream_t *st = NULL;
    size_t pos = skip_ws(s, start, stop);
    if (pos >= stop || s[pos] != '{') {
        return SC_EVENT;
    }
    pos = skip_ws(s, pos + 1, stop);
    if (pos < stop && s[pos] == '}') {
        return SC_EVENT; /* no `type` */
    }
    for (;;) {
        if (pos >= stop || s[pos] != '"') {
            return SC_EVENT;
        }
        size_t name_at = pos + 1;
        int escaped = 0;
        if (parse_string(s, &pos, stop, &escaped) || escaped) {
            return SC_EVENT; /* an escaped name might decode to `type` or `stream` */
        }
        size_t name_len = pos - 1 - name_at;
        int which = 0; /* 1 type, 2 stream, 3 record */
        if (name_len == 4 && memcmp(s + name_at, "type", 4) == 0) {
            which = 1;
        } else if (name_len == 6 && memcmp(s + name_at, "stream", 6) == 0) {
            which = 2;
        } else if (name_len == 6 && memcmp(s + name_at, "record", 6) == 0) {
            which = 3;
        }
        pos = skip_ws(s, pos, stop);
        if (pos >= stop || s[pos] != ':') {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos + 1, stop);
        if (pos >= stop) {
            return SC_EVENT;
        }
        size_t value_at = pos;
        if (which == 1 || which == 2) {
            if (s[pos] != '"' || parse_string(s, &pos, stop, &escaped) || escaped) {
                return SC_EVENT;
            }
            if (which == 1) {
                if (has_type) {
                    return SC_EVENT;
                }
                has_type = 1;
                type_at = value_at + 1;
                type_len = pos - 1 - type_at;
            } else {
                if (has_stream) {
                    return SC_EVENT;
                }
                has_stream = 1;
                stream_at = value_at + 1;
                stream_len = pos - 1 - stream_at;
                st = find_stream(sc, s + stream_at, stream_len);
                if (st == NULL) {
                    return SC_EVENT; /* no SCHEMA seen yet (or never): Python reports it */
                }
            }
        } else if (which == 3) {
            if (has_record) {
                return SC_EVENT;
            }
            has_record = 1;
            record_at = pos;
            if (st != NULL && st->nkeys > 0 && s[pos] == '{') {
                ln.keyed = st;
                memset(ln.key_found, 0, sizeof(ln.key_found));
                if (parse_object(s, &pos, stop, 1, &ln)) {
                    return SC_EVENT;
                }
            } else if (parse_value(s, &pos, stop, 1)) {
                return SC_EVENT;
            }
        } else if (parse_value(s, &pos, stop, 1)) {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos, stop);
        if (pos >= stop) {
            return SC_EVENT;
        }
        if (s[pos] == '}') {
            pos = skip_ws(s, pos + 1, stop);
            break;
        }
        if (s[pos] != ',') {
            return SC_EVENT;
        }
        pos = skip_ws(s, pos + 1, stop);
    }
    if (pos < stop && s[pos] != '\n') {
        return SC_EVENT; /* trailing characters */
    }
    if (!has_type || type_len != 6 || memcmp(s + type_at, "RECORD", 6) != 0 || st == NULL) {
        return SC_EVENT;
    }
    *end = pos;
    *out = st;
    sc->key.len = 0;
    if (st->nkeys < 0) {
        return SC_EVENT; /* more key properties than handled here */
    }
    if (st->nkeys == 0) {
        return SC_OK;
    }
    if (!has_record || s[record_at] != '{') {
        return SC_EVENT; /* keys.py cannot read the key either; Python decides */
    }
    if (ln.keyed == NULL) { /* `record` came before `stream`: find the keys now */
        ln.keyed = st;
        memset(ln.key_found, 0, sizeof(ln.key_found));
        size_t again = record_at;
        if (parse_object(s, &again, stop, 1, &ln)) {
            return SC_EVENT;
        }
    }
    for (int k = 0; k < st->nkeys; k++) {
        int r = ln.key_found[k] ? canon_component(&sc->key, s, ln.key_at[k], ln.key_end[k])
                                : (put_tagged(&sc->key, 'N', NULL, 0) ? SC_NOMEM : SC_OK);
        if (r != SC_OK) {
            return r;
        }
    }
    return SC_OK;
}

/* ---- the Python type ----------------------------------------------------------------------- */

static int flush_pending(Scanner *sc) {
    int failed = 0;
    for (int i = 0; i < sc->npending; i++) {
        pending_t *p = &sc->pending[i];
        keyset_t *set = &p->st->set;
        size_t before = set->used;
        if (!failed && keyset_add(set, sc->pending_keys.p + p->off, p->len, p->hash)) {
            failed = 1;
        }
        sc->key_count += set->used - before;
        sc->key_bytes += (set->used - before) * (p->len + sizeof(slot_t));
    }
    sc->npending = 0;
    sc->pending_keys.len = 0;
    return failed ? -1 : 0;
}

static int queue_key(Scanner *sc, stream_t *st) {
    uint64_t h = hash_bytes(sc->key.p, sc->key.len);
    if (st->set.cap) {
        __builtin_prefetch(&st->set.slots[h & (st->set.cap - 1)]);
    }
    pending_t *p = &sc->pending[sc->npending++];
    p->st = st;
    p->hash = h;
    p->off = sc->pending_keys.len;
    p->len = sc->key.len;
    if (buf_put(&sc->pending_keys, sc->key.p, sc->key.len)) {
        sc->npending--;
        return -1;
    }
    return sc->npending == PENDING ? flush_pending(sc) : 0;
}

static void stream_free(stream_t *st) {
    for (int k = 0; k < (st->nkeys > 0 ? st->nkeys : 0); k++) {
        free(st->keys[k]);
    }
    free(st->name);
    keyset_free(&st->set);
    free(st);
}

static void Scanner_dealloc(Scanner *sc) {
    for (size_t i = 0; i < sc->nstreams; i++) {
        stream_free(sc->streams[i]);
    }
    free(sc->streams);
    free(sc->index);
    free(sc->key.p);
    free(sc->pending_keys.p);
    Py_TYPE(sc)->tp_free((PyObject *)sc);
}

static int check_idle(Scanner *sc) {
    if (sc->busy) {
        PyErr_SetString(PyExc_RuntimeError, "the scanner is in use by another thread");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(register_doc,
             "register(name: bytes, keys: tuple[bytes, ...] | None) -> None\n"
             "A stream whose SCHEMA was seen (records are counted here), with its key properties.");

static PyObject *Scanner_register(Scanner *sc, PyObject *args) {
    Py_buffer name;
    PyObject *keys;
    if (check_idle(sc) || !PyArg_ParseTuple(args, "y*O", &name, &keys)) {
        return NULL;
    }
    stream_t *st = find_stream(sc, name.buf, (size_t)name.len);
    if (st == NULL) {
        st = calloc(1, sizeof(stream_t));
        if (st == NULL || (st->name = malloc((size_t)name.len + 1)) == NULL) {
            free(st);
            PyBuffer_Release(&name);
            return PyErr_NoMemory();
        }
        memcpy(st->name, name.buf, (size_t)name.len);
        st->name_len = (size_t)name.len;
        st->hash = hash_bytes(st->name, st->name_len);
        if (sc->nstreams == sc->cap) {
            size_t cap = sc->cap ? sc->cap * 2 : 16;
            stream_t **grown = realloc(sc->streams, cap * sizeof(stream_t *));
            if (grown == NULL) {
                stream_free(st);
                PyBuffer_Release(&name);
                return PyErr_NoMemory();
            }
            sc->streams = grown;
            sc->cap = cap;
        }
        sc->streams[sc->nstreams++] = st;
        if (sc->nstreams * 2 > sc->index_cap) {
            if (index_rebuild(sc, sc->index_cap ? sc->index_cap * 2 : 32)) {
                sc->nstreams--;
                stream_free(st);
                PyBuffer_Release(&name);
                return PyErr_NoMemory();
            }
        } else {
            size_t i = st->hash & (sc->index_cap - 1);
            while (sc->index[i] >= 0) {
                i = (i + 1) & (sc->index_cap - 1);
            }
            sc->index[i] = (int32_t)(sc->nstreams - 1);
        }
    }
    PyBuffer_Release(&name);
    for (int k = 0; k < (st->nkeys > 0 ? st->nkeys : 0); k++) {
        free(st->keys[k]);
    }
    st->nkeys = 0;
    if (keys == Py_None) {
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a tuple of bytes or None");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n > MAX_KEYS) {
        st->nkeys = -1;
        Py_RETURN_NONE;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyTuple_GET_ITEM(keys, k);
        if (!PyBytes_Check(item)) {
            st->nkeys = (int)k;
            PyErr_SetString(PyExc_TypeError, "key property names must be bytes");
            return NULL;
        }
        size_t len = (size_t)PyBytes_GET_SIZE(item);
        st->keys[k] = malloc(len + 1);
        if (st->keys[k] == NULL) {
            st->nkeys = (int)k;
            return PyErr_NoMemory();
        }
        memcpy(st->keys[k], PyBytes_AS_STRING(item), len);
        st->key_lens[k] = len;
        st->nkeys = (int)k + 1;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(scan_doc,
             "scan(buf, start: int, stop: int, now: float) -> (lines, bytes, event_start, event_end)\n"
             "Count the clean RECORD lines of buf[start:stop] (whole lines) until one that Python\n"
             "must see: its span without the newline, or (-1, -1) at the region's end.");

static PyObject *Scanner_scan(Scanner *sc, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, stop;
    double now;
    if (check_idle(sc) || !PyArg_ParseTuple(args, "y*nnd", &view, &start, &stop, &now)) {
        return NULL;
    }
    if (start < 0 || stop > view.len || start > stop) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start/stop outside the buffer");
        return NULL;
    }
    const uint8_t *s = view.buf;
    size_t pos = (size_t)start, end = (size_t)stop;
    long long lines = 0, nbytes = 0;
    Py_ssize_t ev_start = -1, ev_end = -1;
    int result = SC_OK;
    sc->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    while (pos < end) {
        size_t line_end = 0;
        stream_t *st = NULL;
        result = scan_line(sc, s, pos, end, &line_end, &st);
        if (result == SC_OK && line_end < end && st->nkeys > 0 && queue_key(sc, st)) {
            result = SC_NOMEM;
        }
        if (result != SC_OK || line_end >= end) {
            if (result == SC_NOMEM) {
                break;
            }
            /* an event (also the region's last line when it lacks its newline) */
            const uint8_t *nl = memchr(s + pos, '\n', end - pos);
            ev_start = (Py_ssize_t)pos;
            ev_end = nl ? (Py_ssize_t)(nl - s) : (Py_ssize_t)end;
            result = SC_OK;
            break;
        }
        size_t size = line_end + 1 - pos;
        st->records++;
        st->bytes += (long long)size;
        if (!st->seen) {
            st->first = now;
            st->seen = 1;
        }
        st->last = now;
        lines++;
        nbytes += (long long)size;
        pos = line_end + 1;
    }
    if (flush_pending(sc)) {
        result = SC_NOMEM;
    }
    Py_END_ALLOW_THREADS
    sc->busy = 0;
    PyBuffer_Release(&view);
    if (result == SC_NOMEM) {
        return PyErr_NoMemory();
    }
    return Py_BuildValue("LLnn", lines, nbytes, ev_start, ev_end);
}

PyDoc_STRVAR(streams_doc,
             "streams() -> list[tuple[bytes, int, int, float | None, float | None]]\n"
             "Per registered stream: name, records counted here, their bytes, first and last time.");

static PyObject *Scanner_streams(Scanner *sc, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < sc->nstreams; i++) {
        stream_t *st = sc->streams[i];
        PyObject *item;
        if (st->seen) {
            item = Py_BuildValue("y#LLdd", (const char *)st->name, (Py_ssize_t)st->name_len,
                                 st->records, st->bytes, st->first, st->last);
        } else {
            item = Py_BuildValue("y#LLOO", (const char *)st->name, (Py_ssize_t)st->name_len,
                                 st->records, st->bytes, Py_None, Py_None);
        }
        if (item == NULL || PyList_Append(out, item)) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

PyDoc_STRVAR(drain_doc,
             "drain() -> list[tuple[bytes, list[bytes]]]\n"
             "The distinct keys gathered since the last drain, per stream; the sets start empty.");

static PyObject *Scanner_drain(Scanner *sc, PyObject *Py_UNUSED(ignored)) {
    if (check_idle(sc)) {
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < sc->nstreams; i++) {
        stream_t *st = sc->streams[i];
        if (st->set.used == 0) {
            continue;
        }
        PyObject *keys = PyList_New((Py_ssize_t)st->set.used);
        if (keys == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        Py_ssize_t k = 0;
        for (size_t j = 0; j < st->set.cap; j++) {
            slot_t *slot = &st->set.slots[j];
            if (!slot->hash) {
                continue;
            }
            PyObject *key = PyBytes_FromStringAndSize((const char *)st->set.arena.p + slot->off,
                                                      (Py_ssize_t)slot->len);
            if (key == NULL) {
                Py_DECREF(keys);
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(keys, k++, key);
        }
        PyObject *item = Py_BuildValue("(y#N)", (const char *)st->name, (Py_ssize_t)st->name_len, keys);
        if (item == NULL || PyList_Append(out, item)) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        keyset_clear(&st->set);
    }
    sc->key_bytes = 0;
    sc->key_count = 0;
    return out;
}

static PyObject *Scanner_key_bytes(Scanner *sc, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(sc->key_bytes);
}

static PyMethodDef Scanner_methods[] = {
    {"register", (PyCFunction)Scanner_register, METH_VARARGS, register_doc},
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS, scan_doc},
    {"streams", (PyCFunction)Scanner_streams, METH_NOARGS, streams_doc},
    {"drain", (PyCFunction)Scanner_drain, METH_NOARGS, drain_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *Scanner_key_count(Scanner *sc, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(sc->key_count);
}

static PyGetSetDef Scanner_getset[] = {
    {"key_bytes", (getter)Scanner_key_bytes, NULL, "bytes of keys held since the last drain", NULL},
    {"key_count", (getter)Scanner_key_count, NULL, "distinct keys held since the last drain", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flext_meltano_context._scanner.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The relay's per-chunk scanner: counts clean RECORD lines, keeps keyed streams' keys.",
    .tp_methods = Scanner_methods,
    .tp_getset = Scanner_getset,
    .tp_new = PyType_GenericNew,
};

PyDoc_STRVAR(canonical_doc,
             "canonical(raw: bytes) -> bytes | None\n"
             "keys.component() of one raw JSON value, or None where Python must decide (tests).");

static PyObject *module_canonical(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE)) {
        return NULL;
    }
    const uint8_t *s = view.buf;
    size_t pos = 0, stop = (size_t)view.len;
    buf_t b = {NULL, 0, 0};
    PyObject *out = NULL;
    int r = SC_EVENT;
    if (stop > 0 && parse_value(s, &pos, stop, 1) == SC_OK && pos == stop) {
        r = canon_component(&b, s, 0, stop);
    }
    if (r == SC_OK) {
        out = PyBytes_FromStringAndSize((const char *)b.p, (Py_ssize_t)b.len);
    } else if (r == SC_NOMEM) {
        PyErr_NoMemory();
    } else {
        out = Py_NewRef(Py_None);
    }
    free(b.p);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"canonical", module_canonical, METH_O, canonical_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scanner_module = {
    PyModuleDef_HEAD_INIT, "_scanner", "The relay's compiled scanner (issue 14).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scanner(void) {
    if (PyType_Ready(&ScannerType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&scanner_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "ABI_VERSION", ABI_VERSION) ||
        PyModule_AddStringConstant(m, "SOURCE_SHA256", SOURCE_SHA256) ||
        PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
