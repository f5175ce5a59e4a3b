import { Injectable } from '@nestjs/common';

export interface Profile {
  id: string;
  email: string | null;
  createdAt: string;
}

/**
 * Where profiles live. A real backend writes to its database, in one transaction:
 * INSERT the profile ... ON CONFLICT (id) DO NOTHING, and record the webhook-id
 * (a unique column) so a redelivered event is recognised.
 */
@Injectable()
export class ProfilesService {
  private readonly profiles = new Map<string, Profile>();
  private readonly seenEvents = new Set<string>();

  /** Creates the profile once; returns false when this event or user was already handled. */
  createFromEvent(eventId: string, id: string, email: string | null): boolean {
    if (this.seenEvents.has(eventId) || this.profiles.has(id)) {
      this.seenEvents.add(eventId);
      return false;
    }
    this.seenEvents.add(eventId);
    this.profiles.set(id, { id, email, createdAt: new Date().toISOString() });
    return true;
  }

  all(): Profile[] {
    return [...this.profiles.values()];
  }
}
