/**
 * Revisions are canonical decimal strings of an unsigned 64-bit integer
 * (`"0"`, `"42"`, `"18446744073709551615"`). They are compared as numbers
 * without converting them: a canonical string with more digits is larger,
 * and strings of equal length compare like their digits.
 */

const CANONICAL = /^(0|[1-9][0-9]{0,19})$/;
const MAX = "18446744073709551615";

/** Whether `value` is a canonical revision string. */
export function isRevision(value: unknown): value is string {
  return (
    typeof value === "string" &&
    CANONICAL.test(value) &&
    (value.length < MAX.length || value <= MAX)
  );
}

/** Negative, zero or positive as `a` is older than, equal to or newer than `b`. */
export function compareRevisions(a: string, b: string): number {
  if (a.length !== b.length) return a.length - b.length;
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Whether `candidate` is newer than `current` (anything is newer than nothing). */
export function isNewer(candidate: string, current: string | undefined): boolean {
  return current === undefined || compareRevisions(candidate, current) > 0;
}
