import { Injectable } from '@nestjs/common';

export interface Profile {
  id: string;
  email: string | null;
  createdAt: string;
  updatedAt: string;
}

/**
 * Where profiles live. A real backend writes to its database, in one transaction:
 * INSERT the profile ... ON CONFLICT (id) DO NOTHING (or the UPDATE, or the DELETE),
 * and record the webhook-id (a unique column) so a redelivered event is recognised.
 * pg_new_user_hook sends a user's events one at a time, in commit order, so an
 * update never arrives before the creation, nor a creation after the deletion.
 */
@Injectable()
export class ProfilesService {
  private readonly profiles = new Map<string, Profile>();
  private readonly seenEvents = new Set<string>();

  /** Whether this event was handled before (and notes it): a redelivery changes nothing. */
  private firstTime(eventId: string): boolean {
    if (this.seenEvents.has(eventId)) {
      return false;
    }
    this.seenEvents.add(eventId);
    return true;
  }

  /** Creates the profile once; returns false when this event or user was already handled. */
  createFromEvent(eventId: string, id: string, email: string | null): boolean {
    if (!this.firstTime(eventId) || this.profiles.has(id)) {
      return false;
    }
    const now = new Date().toISOString();
    this.profiles.set(id, { id, email, createdAt: now, updatedAt: now });
    return true;
  }

  /** Applies a change of the user (an upsert: the profile as the user is now). */
  updateFromEvent(eventId: string, id: string, email: string | null): boolean {
    if (!this.firstTime(eventId)) {
      return false;
    }
    const now = new Date().toISOString();
    const current = this.profiles.get(id);
    this.profiles.set(id, { id, email, createdAt: current?.createdAt ?? now, updatedAt: now });
    return true;
  }

  /** Removes the profile; returns false when there was none. */
  deleteFromEvent(eventId: string, id: string): boolean {
    this.firstTime(eventId);
    return this.profiles.delete(id);
  }

  all(): Profile[] {
    return [...this.profiles.values()];
  }
}
